"""Manager dashboard pages: projects overview and new projects, a project's statistics, reranking and its API keys,
import/export, members, settings and guidelines."""
from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import PermissionDenied
from django.core.serializers.json import DjangoJSONEncoder
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import patch_cache_control
from django.utils.text import slugify
from django.views import View

from labeling import exports, imports, selectors, services, stats
from labeling.errors import DomainError, Forbidden, NotFound, error_body
from labeling.models import ApiToken, Membership, Project
from labeling.views import TextareaField, _first_form_error
from rewards.selectors import rerank_usage, reward_model_deployed, reward_models_deployed

# Which of a reward model's evaluation metrics the overview shows as its held-out accuracy.
HELD_OUT_ACCURACY_KEY = "eval_accuracy"


def managed_project(request: HttpRequest, slug: str) -> Project:
    """The project if the user manages it; 404 for outsiders (names do not leak), 403 for its labelers."""
    try:
        return selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
    except NotFound as exc:
        raise Http404(exc.message)
    except Forbidden as exc:
        raise PermissionDenied(exc.message)


class ImportForm(forms.Form):
    file = forms.FileField(help_text="A JSONL file, one record per line.")
    format = forms.ChoiceField(choices=[(name, name) for name in imports.FORMATS])


class MemberSetForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Membership.Role.choices)


class MemberRemoveForm(forms.Form):
    username = forms.CharField(max_length=150)


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(required=False, max_length=100)


class GuidelinesForm(forms.Form):
    guidelines = TextareaField(required=False, max_length=100_000, widget=forms.Textarea)


class ProjectFieldsForm(forms.Form):
    """The settings services.project_update changes, bounded as the API bounds them. The initial values are those
    of a new project (services.project_create's defaults)."""

    name = forms.CharField(max_length=200)
    labels_per_pair = forms.IntegerField(
        label="Labels per pair", min_value=1, max_value=50, initial=1,
        help_text="How many labelers answer each pair before it is complete (1 to 50).")
    allow_tie = forms.BooleanField(label="Allow “tie”", required=False, initial=True)
    allow_both_bad = forms.BooleanField(label="Allow “both bad”", required=False, initial=True)
    strength_scale = forms.ChoiceField(label="Strength scale", choices=Project.StrengthScale.choices,
                                       initial=Project.StrengthScale.NONE,
                                       help_text="Whether labelers also say how much better the chosen answer is.")
    gold_rate = forms.FloatField(label="Gold rate", min_value=0.0, max_value=1.0, initial=0.0,
                                 help_text="Share of assignments that are gold pairs, from 0 to 1.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class ProjectSettingsForm(ProjectFieldsForm):
    """A project's settings as its page shows them. Each input carries, hidden beside it, the value it was shown
    with, so that the form knows which settings the person changed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "settings-%s")
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            field.show_hidden_initial = True

    def changes(self, *, stored: dict[str, Any]) -> dict[str, Any]:
        """The settings to write: those that differ from the value the form was shown with, or from the stored
        value when the post does not say what it was shown with. A setting that another request changed since
        the page was shown, and that is left alone here, is not written back with its old value."""
        changed = set(self.changed_data)
        return {name: self.cleaned_data[name] for name in self.fields
                if (name in changed if self[name].html_initial_name in self.data
                    else self.cleaned_data[name] != stored[name])}


class ProjectCreateForm(ProjectFieldsForm):
    """A new project: its settings, plus the slug (made from the name when left blank) and the guidelines."""

    slug = forms.SlugField(
        max_length=100, required=False,
        help_text="Letters, digits, hyphens and underscores; it is part of the project's URLs and cannot be changed "
                  "later. Leave it blank to make one from the name.")
    guidelines = TextareaField(required=False, max_length=100_000, widget=forms.Textarea(attrs={"rows": 6}),
                               help_text="Markdown shown to labelers above every pair; it can be edited later.")

    field_order = ["name", "slug", "labels_per_pair", "allow_tie", "allow_both_bad", "strength_scale", "gold_rate",
                   "guidelines"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "new-project-%s")
        super().__init__(*args, **kwargs)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if not cleaned.get("slug") and "slug" not in self.errors and cleaned.get("name"):
            # Cut at the column's length, then drop separators left dangling at the cut.
            slug = slugify(cleaned["name"])[:100].strip("-_")
            if slug:
                cleaned["slug"] = slug
            else:
                self.add_error("slug", "No slug can be made from this name: enter one.")
        return cleaned


def _settings_of(project: Project) -> dict[str, Any]:
    return {name: getattr(project, name) for name in ProjectFieldsForm.base_fields}


def _refused(form: forms.Form, exc: DomainError) -> None:
    """Show a service's refusal next to the field it names, or above the form when it names none of them."""
    form.add_error(exc.field if exc.field in form.fields else None, exc.message)


def _focus_first_error(form: forms.Form) -> None:
    """The first field in error takes the focus when the page comes back, so a keyboard user starts there."""
    for name in form.fields:
        if name in form.errors:
            form.fields[name].widget.attrs["autofocus"] = True
            return


def _project_page(request: HttpRequest, project: Project, *, status: int = 200,
                  **extra: Any) -> HttpResponse:
    project_stats = stats.project_stats(project=project)
    agreement = project_stats["agreement"]
    memberships = list(selectors.membership_list(project=project))
    # Staff label every project without a membership: their rows are not those of a labeler who was removed.
    staff_ids = set(get_user_model().objects.filter(
        pk__in=[row["labeler"]["id"] for row in project_stats["labelers"]], is_staff=True).values_list("pk", flat=True))
    context: dict[str, Any] = {
        "project": project,
        "stats": project_stats,
        "agreement": agreement,
        "labeler_rows": selectors.labeler_table(
            stats=project_stats, member_ids={membership.user_id for membership in memberships} | staff_ids),
        "choice_rows": [(choice, project_stats["choices"][choice]) for choice in stats.CHOICES],
        "throughput_rows": project_stats["throughput"]["buckets"],
        "memberships": memberships,
        "roles": Membership.Role.choices,
        "import_formats": imports.FORMATS,
        "export_formats": exports.FORMATS,
        "reward_model": reward_model_deployed(project=project),
        "rerank": rerank_usage(project=project),
        "api_keys": selectors.api_key_list(project=project),
        "settings_form": ProjectSettingsForm(initial=_settings_of(project)),
        "outlier_rule": {
            "min_labels": selectors.OUTLIER_MIN_LABELS, "left_band": selectors.OUTLIER_LEFT_SHARE_BAND,
            "left_p": f"{selectors.OUTLIER_LEFT_SHARE_P:.0%}",
            "gold_min": selectors.OUTLIER_GOLD_ACCURACY_MIN, "gold_answers": selectors.OUTLIER_GOLD_MIN_ANSWERS,
            "seconds_min": selectors.OUTLIER_MEDIAN_SECONDS_MIN, "timed_min": selectors.OUTLIER_MEDIAN_MIN_TIMED,
            "agreement_min": selectors.OUTLIER_AGREEMENT_MIN,
            "agreement_pairs": selectors.OUTLIER_AGREEMENT_MIN_PAIRS,
        },
        **extra,
    }
    return render(request, "labeling/dashboard/project.html", context, status=status)


def _overview_page(request: HttpRequest, *, create_form: ProjectCreateForm | None = None,
                   status: int = 200) -> HttpResponse:
    projects = list(selectors.project_list_managed_by(user=request.user))
    if not projects and not request.user.is_staff:
        raise PermissionDenied("The dashboard is for project managers.")
    activity = selectors.project_recent_activity(projects=projects)
    pairs = stats.pair_counts_by_project(projects=projects)
    deployed = reward_models_deployed(projects=projects)
    agreement = stats.agreement_summary_by_project(projects=projects)
    rows = []
    for project in projects:
        reward_model = deployed.get(project.pk)
        rows.append({
            "project": project,
            "pairs": pairs[project.pk],
            "activity": activity[project.pk],
            "agreement": agreement[project.pk],
            "reward_model": reward_model,
            "held_out_accuracy": (reward_model.metrics or {}).get(HELD_OUT_ACCURACY_KEY) if reward_model else None,
        })
    # Creating a project is for admins, as in the API (ProjectCreateApi): no one else sees the form.
    if create_form is None and request.user.is_staff:
        create_form = ProjectCreateForm()
    return render(request, "labeling/dashboard/overview.html", {"rows": rows, "create_form": create_form},
                  status=status)


class DashboardView(LoginRequiredMixin, View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return _overview_page(request)

    def post(self, request: HttpRequest) -> HttpResponse:
        """Create a project from the overview's form and go to its page."""
        if not request.user.is_staff:
            raise PermissionDenied("Only admins create projects.")
        form = ProjectCreateForm(request.POST)
        if not form.is_valid():
            _focus_first_error(form)
            return _overview_page(request, create_form=form, status=400)
        try:
            project = services.project_create(created_by=request.user, **form.cleaned_data)
        except DomainError as exc:  # a slug that is taken or reserved
            _refused(form, exc)
            _focus_first_error(form)
            return _overview_page(request, create_form=form, status=exc.status_code)
        messages.success(request, f"The project {project.name} was created; you are its manager.")
        return redirect("dashboard:project", slug=project.slug)


class ProjectDashboardView(LoginRequiredMixin, View):
    def get(self, request: HttpRequest, slug: str) -> HttpResponse:
        return _project_page(request, managed_project(request, slug))


class ProjectChartsView(LoginRequiredMixin, View):
    """The numbers behind the project page's charts, straight from labeling.stats."""

    def get(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        raw_hours = request.GET.get("hours", str(stats.THROUGHPUT_DEFAULT_HOURS))
        try:
            throughput = stats.comparison_throughput_hourly(project=project, hours=int(raw_hours))
        except ValueError:
            return JsonResponse(error_body(message="hours must be a whole number.", code="invalid", field="hours"),
                                status=400)
        except DomainError as exc:
            return JsonResponse(error_body(message=exc.message, code=exc.code, field=exc.field),
                                status=exc.status_code)
        agreement = stats.labeler_agreement(project=project)
        data = {
            "throughput": throughput,
            "choices": stats.choice_distribution(project=project),
            "agreement_by_labeler": agreement["per_labeler"],
            "agreement_daily": agreement["daily"],
        }
        return JsonResponse(data, encoder=DjangoJSONEncoder)


class ProjectRerankView(LoginRequiredMixin, View):
    """The numbers behind the project page's reranking chart and table, straight from rewards.selectors."""

    def get(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        raw_minutes = request.GET.get("minutes", "60")
        try:
            usage = rerank_usage(project=project, minutes=int(raw_minutes))
        except ValueError:
            return JsonResponse(error_body(message="minutes must be a whole number.", code="invalid",
                                           field="minutes"), status=400)
        except DomainError as exc:
            return JsonResponse(error_body(message=exc.message, code=exc.code, field=exc.field),
                                status=exc.status_code)
        return JsonResponse(usage, encoder=DjangoJSONEncoder)


def _api_keys_panel(request: HttpRequest, project: Project, *, status: int = 200, **extra: Any) -> HttpResponse:
    """The API keys panel alone for htmx, else the whole project page with the panel in the same state."""
    if request.headers.get("HX-Request") == "true":
        context = {"project": project, "api_keys": selectors.api_key_list(project=project), **extra}
        response = render(request, "labeling/dashboard/_api_keys.html", context, status=status)
    else:
        response = _project_page(request, project, status=status, **extra)
    # A new key is in the body: it must not be kept by a browser or proxy cache.
    patch_cache_control(response, no_store=True)
    return response


class ApiKeyCreateView(LoginRequiredMixin, View):
    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        form = ApiKeyCreateForm(request.POST)
        if not form.is_valid():
            field, message = _first_form_error(form)
            return _api_keys_panel(request, project, status=400, key_error=message, key_error_field=field)
        token, key = services.api_token_create(user=request.user, project=project, scope=ApiToken.Scope.RERANK,
                                               name=form.cleaned_data["name"].strip())
        return _api_keys_panel(request, project, status=201, new_key=key, new_token=token)


class ApiKeyRevokeView(LoginRequiredMixin, View):
    def post(self, request: HttpRequest, slug: str, prefix: str) -> HttpResponse:
        project = managed_project(request, slug)
        try:
            token = services.api_token_revoke(token=selectors.api_key_get(project=project, prefix=prefix))
        except DomainError as exc:
            return _api_keys_panel(request, project, status=exc.status_code, key_error=exc.message,
                                   key_error_field=exc.field)
        if request.headers.get("HX-Request") == "true":
            return _api_keys_panel(request, project, revoked=token)
        messages.success(request, f"The key {token.prefix}… is revoked.")
        return redirect(reverse("dashboard:project", kwargs={"slug": project.slug}) + "#api-keys")


class ProjectImportView(LoginRequiredMixin, View):
    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        form = ImportForm(request.POST, request.FILES)
        # The form comes back with the format that was chosen: a file picked again after an error is read as
        # that format, not as whichever comes first in the list.
        values = request.POST
        if not form.is_valid():
            field, message = _first_form_error(form)
            return _project_page(request, project, status=400, import_error=message, import_error_field=field,
                                 import_values=values)
        upload = form.cleaned_data["file"]
        limit = int(settings.PREFLAB["IMPORT_MAX_BYTES"])
        if upload.size > limit:
            return _project_page(request, project, status=413, import_error_field="file",
                                 import_error=f"file: the file is {upload.size} bytes; the limit is {limit}.",
                                 import_values=values)
        upload.seek(0)
        try:
            report = imports.preferences_import(project=project, stream=upload.file,
                                                format=form.cleaned_data["format"])
        except DomainError as exc:  # the file as a whole is refused (an archive): nothing was imported
            return _project_page(request, project, status=exc.status_code, import_error_field=exc.field,
                                 import_error=f"{exc.field}: {exc.message}" if exc.field else exc.message,
                                 import_values=values)
        return _project_page(request, project, import_report=report.as_dict(), import_name=upload.name,
                             import_values=values)


class ProjectExportView(LoginRequiredMixin, View):
    def get(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        fmt = request.GET.get("format", "trl")
        try:
            lines = exports.preferences_export(project=project, format=fmt)
        except DomainError as exc:
            messages.error(request, f"{exc.field}: {exc.message}" if exc.field else exc.message)
            return redirect("dashboard:project", slug=project.slug)
        response = StreamingHttpResponse(exports.blocks(lines), content_type="application/jsonl; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{project.slug}-{fmt}.jsonl"'
        return response


class MemberSetView(LoginRequiredMixin, View):
    """Add a member by username, or change an existing member's role."""

    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        form = MemberSetForm(request.POST)
        if not form.is_valid():
            field, message = _first_form_error(form)
            return _project_page(request, project, status=400, member_error=message, member_error_field=field,
                                 member_values=request.POST)
        username = form.cleaned_data["username"].strip()
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            return _project_page(request, project, status=400, member_error_field="username",
                                 member_error=f"username: there is no user called '{username}'.",
                                 member_values=request.POST)
        existed = Membership.objects.filter(project=project, user=user).exists()
        try:
            membership = services.membership_set(project=project, user=user, role=form.cleaned_data["role"])
        except DomainError as exc:
            return _project_page(request, project, status=exc.status_code, member_error_field=exc.field,
                                 member_error=exc.message, member_values=request.POST)
        verb = "is now" if existed else "was added as"
        messages.success(request, f"{user.get_username()} {verb} {membership.get_role_display().lower()}.")
        return redirect("dashboard:project", slug=project.slug)


class MemberRemoveView(LoginRequiredMixin, View):
    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        form = MemberRemoveForm(request.POST)
        user = None
        if form.is_valid():
            user = get_user_model().objects.filter(username=form.cleaned_data["username"]).first()
        if user is None:
            return _project_page(request, project, status=400, member_error_field="username",
                                 member_error="username: no such member to remove.")
        try:
            services.membership_remove(project=project, user=user)
        except DomainError as exc:
            return _project_page(request, project, status=exc.status_code, member_error_field=exc.field,
                                 member_error=exc.message)
        messages.success(request, f"{user.get_username()} was removed from {project.name}.")
        return redirect("dashboard:project", slug=project.slug)


class GuidelinesView(LoginRequiredMixin, View):
    """Edit the project's markdown guidelines; "Preview" shows them as labelers will see them, unsaved."""

    def get(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        return render(request, "labeling/dashboard/guidelines.html",
                      {"project": project, "text": project.guidelines, "preview": None})

    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        form = GuidelinesForm(request.POST)
        text = request.POST.get("guidelines", "")
        if not form.is_valid():
            field, message = _first_form_error(form)
            return render(request, "labeling/dashboard/guidelines.html",
                          {"project": project, "text": text, "preview": None, "error": message,
                           "error_field": field}, status=400)
        text = form.cleaned_data["guidelines"]
        if request.POST.get("action") == "preview":
            return render(request, "labeling/dashboard/guidelines.html",
                          {"project": project, "text": text, "preview": text, "unsaved": text != project.guidelines})
        services.project_update(project=project, guidelines=text)
        messages.success(request, "Guidelines saved.")
        return redirect("dashboard:project", slug=project.slug)


class ProjectSettingsView(LoginRequiredMixin, View):
    """Change the project's settings from the form on its page, through services.project_update."""

    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = managed_project(request, slug)
        stored = _settings_of(project)
        form = ProjectSettingsForm(request.POST, initial=stored)
        if not form.is_valid():
            _focus_first_error(form)
            return _project_page(request, project, status=400, settings_form=form)
        changes = form.changes(stored=stored)
        if not changes:
            messages.info(request, "Nothing to save: no setting was changed.")
            return redirect("dashboard:project", slug=project.slug)
        try:
            project = services.project_update(project=project, **changes)
        except DomainError as exc:
            _refused(form, exc)
            _focus_first_error(form)
            return _project_page(request, project, status=exc.status_code, settings_form=form)
        changed = ", ".join(str(form[name].label).lower() for name in changes)
        messages.success(request, f"Settings saved ({changed}).")
        # To the top of the page, where the message is, as after the other forms of the page.
        return redirect("dashboard:project", slug=project.slug)
