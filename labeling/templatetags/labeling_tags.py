"""Template filters of the labeling pages: markdown rendered safely for untrusted model output and guidelines."""
from __future__ import annotations

import markdown
import nh3
from django import template
from django.utils.safestring import SafeString, mark_safe

register = template.Library()

_TAGS = {
    "p", "br", "hr", "strong", "em", "b", "i", "del", "sup", "sub", "code", "pre", "blockquote", "ul", "ol", "li",
    "a", "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "dl", "dt", "dd",
}
_ATTRIBUTES = {"a": {"href", "title"}, "code": {"class"}, "ol": {"start"}, "th": {"align"}, "td": {"align"}}


def _markdown_to_html(text: str) -> str:
    # A fresh converter per call: Markdown instances keep state and are not safe to share between threads.
    converter = markdown.Markdown(extensions=["fenced_code", "tables", "sane_lists", "nl2br"], output_format="html")
    # Raw HTML in a model's answer is part of what it wrote: show it as text instead of letting the browser
    # interpret it. nh3 then removes anything the converter itself could emit that we do not allow.
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    return converter.convert(text)


def render_markdown(text: str | None) -> SafeString:
    """Markdown to HTML where raw HTML is shown as text, links are http(s)/mailto only and nothing can run."""
    if not text:
        return mark_safe("")
    html = nh3.clean(
        _markdown_to_html(str(text)),
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )
    # Safe to mark: nh3 has just removed every tag, attribute and URL scheme outside the allowlists.
    return mark_safe(html)


@register.filter(name="markdown_safe")
def markdown_safe(value: str | None) -> SafeString:
    return render_markdown(value)
