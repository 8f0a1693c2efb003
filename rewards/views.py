"""Training pages for managers: start runs, follow their progress, read a run's curves, cancel and deploy."""
from __future__ import annotations

import uuid
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.cache import patch_vary_headers
from django.views import View

from labeling.dashboard_views import managed_project
from labeling.errors import DomainError, Forbidden, NotFound
from labeling.models import Project
from labeling.views import _first_form_error
from rewards import selectors, services
from rewards.models import RewardModel, TrainingRun
from rewards.training.dpo import DPO_DEFAULTS
from rewards.training.reward import REWARD_DEFAULTS
from rewards.training.rlhf import RLHF_DEFAULTS

RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    TrainingRun.Kind.REWARD: REWARD_DEFAULTS,
    TrainingRun.Kind.DPO: DPO_DEFAULTS,
    TrainingRun.Kind.RLHF: RLHF_DEFAULTS,
}
# The hyperparameters the start form offers, by TRL config field name; every other one keeps its recipe default.
FORM_HYPERPARAMETERS: tuple[tuple[str, str, str], ...] = (
    ("learning_rate", "Learning rate", "any"),
    ("num_train_epochs", "Epochs", "any"),
    ("per_device_train_batch_size", "Batch size per device", "1"),
    ("max_length", "Max length (tokens)", "1"),
)


class StartForm(forms.Form):
    kind = forms.ChoiceField(choices=TrainingRun.Kind.choices)
    base_model = forms.CharField(required=False, max_length=500)
    learning_rate = forms.FloatField(required=False)
    num_train_epochs = forms.FloatField(required=False)
    per_device_train_batch_size = forms.IntegerField(required=False)
    max_length = forms.IntegerField(required=False)
    # A token rendered into each form: the same form posted twice (a double click without JavaScript, a resend
    # after a timeout) starts one run.
    submission = forms.CharField(required=False, max_length=64)


def _not_found_or_forbidden(exc: DomainError) -> Exception:
    return PermissionDenied(exc.message) if isinstance(exc, Forbidden) else Http404(exc.message)


def _managed_run(request: HttpRequest, run_id: int) -> TrainingRun:
    try:
        return selectors.training_run_get_for_user(run_id=run_id, user=request.user, manage=True)
    except (NotFound, Forbidden) as exc:
        raise _not_found_or_forbidden(exc)


def _kind_forms(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One start form per kind, its fields filled with that recipe's defaults (or what was just posted)."""
    result = []
    for kind, label in TrainingRun.Kind.choices:
        defaults = RECIPE_DEFAULTS[kind]
        posted = values if values and values.get("kind") == kind else {}
        fields = [{"name": name, "label": text, "step": step, "value": posted.get(name, defaults[name])}
                  for name, text, step in FORM_HYPERPARAMETERS if name in defaults]
        result.append({"kind": kind, "label": label, "fields": fields, "base_model": posted.get("base_model", ""),
                       "open": bool(posted) or (not values and kind == TrainingRun.Kind.REWARD)})
    return result


def _runs_context(request: HttpRequest, project: Project) -> dict[str, Any]:
    runs = list(selectors.training_run_list_for_user(user=request.user, project_slug=project.slug)[:50])
    return {"project": project, "runs": runs, "polling": selectors.training_runs_active(runs=runs)}


def _training_page(request: HttpRequest, project: Project, *, status: int = 200, **extra: Any) -> HttpResponse:
    context = {
        **_runs_context(request, project),
        "kind_forms": _kind_forms(extra.pop("values", None)),
        "reward_models": selectors.reward_model_list(project=project),
        "submission_token": uuid.uuid4().hex,
        **extra,
    }
    return render(request, "rewards/training.html", context, status=status)


class TrainingPageView(LoginRequiredMixin, View):
    def get(self, request: HttpRequest, slug: str) -> HttpResponse:
        return _training_page(request, managed_project(request, slug))


class TrainingRunsView(LoginRequiredMixin, View):
    """The runs list alone, polled by htmx while a run is queued or running."""

    def get(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        return render(request, "rewards/_runs.html", _runs_context(request, project))


class TrainingRunStartView(LoginRequiredMixin, View):
    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        form = StartForm(request.POST)
        values = request.POST.dict()
        if not form.is_valid():
            field, message = _first_form_error(form)
            return _training_page(request, project, status=400, error=message, error_field=field, values=values)
        data = form.cleaned_data
        defaults = RECIPE_DEFAULTS[data["kind"]]
        hyperparameters = {name: data[name] for name, _, _ in FORM_HYPERPARAMETERS
                           if name in defaults and data[name] is not None}
        submission = {"project": project, "kind": data["kind"], "created_by": request.user,
                      "base_model": data["base_model"], "hyperparameters": hyperparameters,
                      "restrict_to_import_dirs": True}
        try:
            if data["submission"]:
                run, _ = services.training_run_start_once(idempotency_key=f"form-{data['submission']}", **submission)
            else:
                run = services.training_run_start(**submission)
        except DomainError as exc:
            # The template names the field beside the message ("Not started (field): message").
            field = exc.field.removeprefix("hyperparameters.") if exc.field else None
            return _training_page(request, project, status=exc.status_code, error=exc.message, error_field=field,
                                  values=values)
        # No flash message: the run page says "queued" itself, and only while the run is (see _run_live.html).
        return redirect("training:run", run_id=run.pk)


def _bucket_lower_bound(bucket: str) -> float:
    """Prompt-length buckets are named "0-63", "64-127", ..., "512+"; a JSONB column does not keep their order."""
    head = bucket.split("-")[0].rstrip("+")
    return int(head) if head.isdigit() else float("inf")


def _eval_tables(eval_metrics: dict[str, Any]) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """The run's evaluation metrics as (name, value) rows, and eval_by_length (the reward recipe's
    {bucket: {"pairs": n, "accuracy": a}}) as rows of its own table, shortest prompts first."""
    by_length = eval_metrics.get("eval_by_length")
    scalars = sorted((name, value) for name, value in eval_metrics.items()
                     if not (name == "eval_by_length" and isinstance(by_length, dict)))
    rows = []
    if isinstance(by_length, dict):
        for bucket in sorted(by_length, key=_bucket_lower_bound):
            entry = by_length[bucket] if isinstance(by_length[bucket], dict) else {}
            rows.append({"bucket": bucket, "pairs": entry.get("pairs"), "accuracy": entry.get("accuracy")})
    return scalars, rows


def _latest_metrics(run: TrainingRun) -> dict[str, Any] | None:
    """The last logged history entry with a step, without the step and epoch it names."""
    for entry in reversed(run.metrics_history or []):
        if isinstance(entry, dict) and isinstance(entry.get("step"), (int, float)):
            values = sorted((name, format(value, ".4g")) for name, value in entry.items()
                            if name not in ("step", "epoch") and isinstance(value, (int, float))
                            and not isinstance(value, bool))
            return {"step": entry["step"], "metrics": values}
    return None


def _run_context(run: TrainingRun) -> dict[str, Any]:
    """Everything the polled part of the run page shows; the page and the fragment render the same context."""
    try:
        # Joined in by the selector that loaded the run: no query of its own on every poll.
        registered = run.registered_reward_model
    except RewardModel.DoesNotExist:
        registered = None
    eval_metrics, eval_by_length = _eval_tables(run.eval_metrics or {})
    return {
        "run": run,
        "active": run.status in (TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING),
        "registered": registered,
        "deployable": registered is not None and not registered.is_deployed,
        "hyperparameters": sorted(run.hyperparameters.items()),
        "eval_metrics": eval_metrics,
        "eval_by_length": eval_by_length,
        "latest": _latest_metrics(run),
        "curves": selectors.training_run_curves(run=run),
    }


class RunPageView(LoginRequiredMixin, View):
    def get(self, request: HttpRequest, run_id: int) -> HttpResponse:
        return render(request, "rewards/run.html", _run_context(_managed_run(request, run_id)))


class RunStatusView(LoginRequiredMixin, View):
    """The changing part of the run page (status, curves, evaluation, log), polled by htmx until the run ends;
    the fragment of an ended run carries no trigger, so the polling stops there."""

    def get(self, request: HttpRequest, run_id: int) -> HttpResponse:
        response = render(request, "rewards/_run_live.html", _run_context(_managed_run(request, run_id)))
        patch_vary_headers(response, ["HX-Request"])
        return response


class RunMetricsView(LoginRequiredMixin, View):
    def get(self, request: HttpRequest, run_id: int) -> HttpResponse:
        run = _managed_run(request, run_id)
        return JsonResponse({"run": run.pk, "status": run.status, "step": run.step, "total_steps": run.total_steps,
                             "curves": selectors.training_run_curves(run=run)})


class RunCancelView(LoginRequiredMixin, View):
    def post(self, request: HttpRequest, run_id: int) -> HttpResponse:
        run = _managed_run(request, run_id)
        try:
            run = services.training_run_cancel(run=run)
        except DomainError as exc:
            messages.error(request, exc.message)
        else:
            # A running run stops at its next logging step: the page's own fragment says so while it runs, and no
            # longer once it has stopped (a flash message would outlive it).
            if run.status == TrainingRun.Status.CANCELLED:
                messages.success(request, f"Run {run.pk} was cancelled.")
        return redirect("training:run", run_id=run.pk)


class RewardModelDeployView(LoginRequiredMixin, View):
    def post(self, request: HttpRequest, reward_model_id: int) -> HttpResponse:
        try:
            model = selectors.reward_model_get_for_user(reward_model_id=reward_model_id, user=request.user,
                                                        manage=True)
        except (NotFound, Forbidden) as exc:
            raise _not_found_or_forbidden(exc)
        try:
            model = services.reward_model_deploy(reward_model=model, deployed_by=request.user)
        except DomainError as exc:
            messages.error(request, f"Version {model.version} was not deployed: {exc.message}")
        else:
            messages.success(request, f"Reward model v{model.version} is now deployed.")
        if request.POST.get("next") == "run" and model.training_run_id:
            return redirect("training:run", run_id=model.training_run_id)
        return redirect("training:training", slug=model.project.slug)
