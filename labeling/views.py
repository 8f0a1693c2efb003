"""Pages for people: the labeler's project list and the labeling screen, server-rendered, with htmx swapping
the labeling panel and plain form posts when JavaScript is off."""
from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import NON_FIELD_ERRORS
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import add_never_cache_headers, patch_vary_headers
from django.views import View

from labeling import selectors, services
from labeling.errors import DomainError, NotFound
from labeling.models import ID_MAX, Comparison, Pair, Project

# Keys 1-4 are the choices; the strength keys sit on the row above so one hand reaches both.
CHOICE_BUTTONS = (
    ("left", "1", "Left is better"),
    ("right", "2", "Right is better"),
    ("tie", "3", "Tie"),
    ("both_bad", "4", "Both are bad"),
)
STRENGTH_OPTIONS = ((1, "q", "Slightly better"), (2, "w", "Clearly better"), (3, "e", "Much better"))
# Refusals whose API wording tells a client what to call next; on the page the labeler's current pair is already
# shown below the message, so it says what happened instead.
PAGE_MESSAGES = {
    "not_leased": "You no longer hold this pair: it was skipped (perhaps in another tab) or went back to the queue.",
}


def _is_htmx(request: HttpRequest) -> bool:
    return request.headers.get("HX-Request") == "true"


def _project_for(request: HttpRequest, slug: str) -> Project:
    try:
        return selectors.project_get_for_user(slug=slug, user=request.user)
    except NotFound as exc:
        raise Http404(exc.message)


def id_form_field() -> forms.IntegerField:
    """A form input naming a row by id, bounded like the database's ids: past them it is a form error, not a
    database error on the query."""
    return forms.IntegerField(min_value=1, max_value=ID_MAX)


class TextareaField(forms.CharField):
    """Text from a <textarea>, every line break as one line feed. A browser counts a line break as one character
    against the box's maxlength but a plain form post sends it as CRLF: without this a rationale that fit the box
    was refused as too long, and stored with other line breaks than the same text sent by htmx (which sends LF)."""

    def to_python(self, value: Any) -> str:
        text = super().to_python(value)
        return text.replace("\r\n", "\n").replace("\r", "\n") if text else text


def _first_form_error(form: forms.Form) -> tuple[str | None, str]:
    """The first invalid field (None for a form-wide error) and its message; the pages show the field beside the
    message ("Not saved (rationale): ..."), so the message does not repeat it."""
    for field, errors in form.errors.items():
        return (None if field == NON_FIELD_ERRORS else field), errors[0]
    return None, "The form is not valid."


# `_label_response` asks the queue itself unless the caller already holds the labeler's next lease (or None).
_ASK_QUEUE: Any = object()


def _label_response(request: HttpRequest, *, project: Project, status: int = 200, error: str | None = None,
                    error_field: str | None = None, error_title: str = "Not saved", notice: str | None = None,
                    values: dict[str, Any] | None = None, lease: Any = _ASK_QUEUE) -> HttpResponse:
    """The labeling panel (for htmx) or the whole page, showing the labeler's current or next pair. `error_title`
    says what did not happen ("Not saved" for an answer, "Not skipped" for a skip)."""
    if lease is _ASK_QUEUE:
        lease = services.pair_next_for_labeler(project=project, labeler=request.user)
    context: dict[str, Any] = {
        "project": project,
        "lease": None,
        "error": error,
        "error_field": error_field,
        "error_title": error_title,
        "notice": notice,
        "choice_buttons": [button for button in CHOICE_BUTTONS if _choice_allowed(project, button[0])],
        "strength_options": STRENGTH_OPTIONS if project.strength_scale == Project.StrengthScale.ONE_TO_THREE else (),
        "flag_choices": Comparison.Flag.choices,
        "progress": selectors.labeler_progress(projects=[project], user=request.user)[project.pk],
        "values": {"rationale": "", "flags": [], "strength": None},
    }
    if lease is not None:
        pair = lease.pair
        context.update(
            lease=lease,
            prompt_messages=pair.prompt.messages,
            left=pair.response_b if lease.swapped else pair.response_a,
            right=pair.response_a if lease.swapped else pair.response_b,
        )
        # After a refused submit the labeler gets the same pair back with what they typed, so nothing is lost.
        if values and values.get("pair") == lease.pair_id:
            context["values"] = {"rationale": values.get("rationale") or "", "flags": values.get("flags") or [],
                                 "strength": values.get("strength")}
    template = "labeling/_panel.html" if _is_htmx(request) else "labeling/label.html"
    response = render(request, template, context, status=status)
    patch_vary_headers(response, ["HX-Request"])
    # Back and Forward must not show a pair answered since: the browser asks again.
    add_never_cache_headers(response)
    return response


def _choice_allowed(project: Project, choice: str) -> bool:
    if choice == "tie":
        return project.allow_tie
    if choice == "both_bad":
        return project.allow_both_bad
    return True


class _LabelLoginRequiredMixin(LoginRequiredMixin):
    """Login required on the labeling screen's URLs. A labeler whose session ended while the page was open comes
    back to the labeling page after logging in (the submit and skip URLs answer only POST), and an htmx request
    gets a full-page redirect to the login page instead of the login page swapped into the panel."""

    def handle_no_permission(self) -> HttpResponse:
        if self.request.user.is_authenticated:
            return super().handle_no_permission()
        label_url = reverse("labeling:label", kwargs={"slug": self.kwargs["slug"]})
        login = redirect_to_login(label_url, self.get_login_url(), self.get_redirect_field_name())
        if _is_htmx(self.request):
            response = HttpResponse()
            response["HX-Redirect"] = login.url
            add_never_cache_headers(response)
            return response
        return login


class ProjectListView(LoginRequiredMixin, View):
    def get(self, request: HttpRequest) -> HttpResponse:
        projects = list(selectors.project_list_for_user(user=request.user))
        progress = selectors.labeler_progress(projects=projects, user=request.user)
        rows = [{"project": project, "progress": progress[project.pk]} for project in projects]
        return render(request, "labeling/home.html", {"rows": rows})


class LabelPageView(_LabelLoginRequiredMixin, View):
    def get(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = _project_for(request, slug)
        return _label_response(request, project=project)


class LabelSubmitView(_LabelLoginRequiredMixin, View):
    class InputForm(forms.Form):
        pair = id_form_field()
        choice = forms.ChoiceField(choices=[(choice, choice) for choice in services.FRAME_CHOICES])
        strength = forms.TypedChoiceField(choices=[("", "none"), ("1", "1"), ("2", "2"), ("3", "3")], coerce=int,
                                          required=False, empty_value=None)
        rationale = TextareaField(required=False, max_length=10000)
        flags = forms.MultipleChoiceField(choices=Comparison.Flag.choices, required=False)
        time_ms = forms.IntegerField(min_value=0, max_value=2**31 - 1, required=False)

    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = _project_for(request, slug)
        form = self.InputForm(request.POST)
        if not form.is_valid():
            field, message = _first_form_error(form)
            # What the labeler typed comes back as sent: a field that failed is missing from cleaned_data.
            values = {"pair": form.cleaned_data.get("pair"), "rationale": request.POST.get("rationale", ""),
                      "flags": [flag for flag in request.POST.getlist("flags") if flag in Comparison.Flag.values],
                      "strength": form.cleaned_data.get("strength")}
            return _label_response(request, project=project, status=400, error=message, error_field=field,
                                   values=values)
        data = form.cleaned_data
        if not Pair.objects.filter(pk=data["pair"], project=project).exists():
            return _label_response(request, project=project, status=404, error_field="pair",
                                   error=f"Pair {data['pair']} is not part of {project.name}.")
        # The strength radios stay on screen for every choice; a tie or "both bad" has no winner to weigh.
        strength = data["strength"] if data["choice"] in ("left", "right") else None
        answer = {"labeler": request.user, "pair_id": data["pair"], "choice": data["choice"], "strength": strength,
                  "rationale": data["rationale"], "flags": data["flags"], "time_ms": data["time_ms"]}
        try:
            if _is_htmx(request):
                # The panel shows the next pair at once: the answer and the next lease in one transaction.
                result, lease = services.comparison_submit_and_next(**answer)
            else:
                result = services.comparison_submit(**answer)
        except DomainError as exc:
            return _label_response(request, project=project, status=exc.status_code,
                                   error=PAGE_MESSAGES.get(exc.code, exc.message), error_field=exc.field, values=data)
        notice = "Saved." if result.created else "This answer was already saved."
        if _is_htmx(request):
            return _label_response(request, project=project, notice=notice, lease=lease)
        messages.success(request, notice)
        return redirect("labeling:label", slug=project.slug)


class LabelSkipView(_LabelLoginRequiredMixin, View):
    class InputForm(forms.Form):
        pair = id_form_field()

    def post(self, request: HttpRequest, slug: str) -> HttpResponse:
        project = _project_for(request, slug)
        form = self.InputForm(request.POST)
        if not form.is_valid():
            field, message = _first_form_error(form)
            return _label_response(request, project=project, status=400, error=message, error_field=field,
                                   error_title="Not skipped")
        try:
            services.lease_release(project=project, labeler=request.user, pair_id=form.cleaned_data["pair"])
        except DomainError as exc:
            return _label_response(request, project=project, status=exc.status_code, error=exc.message,
                                   error_field=exc.field, error_title="Not skipped")
        # The skipped pair goes back to the queue for others; this labeler moves straight on to the next one.
        return _label_response(request, project=project, notice="Pair skipped.")
