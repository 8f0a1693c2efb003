/* Labeling page: keyboard shortcuts, time-to-answer measurement and focus handling after htmx swaps. */
(function () {
  "use strict";

  var shownAt = performance.now();
  var TEXT_INPUTS = ["text", "search", "email", "url", "tel", "password", "number"];
  // A key pressed twice in quick succession must not answer (or skip) the pair that the first press brought in:
  // for this long after a new panel appears its answer and skip keys do nothing. Nobody reads a pair that fast.
  var SETTLE_MS = 350;
  var settledAt = 0;
  var DRAFT_KEY = "preflab:label-draft";
  // The most the server stores as a time to answer (2^31 - 1 ms, 24.8 days). A pair left on screen longer would
  // otherwise be refused on every answer ("time_ms" out of range), since the time only grows until a reload.
  var TIME_MS_MAX = 2147483647;
  var pairBeforeSwap = null;

  function panel() {
    return document.getElementById("label-panel");
  }

  function labelForm() {
    return document.getElementById("label-form");
  }

  // Drafts are kept per labeler and pair: another account logging in in the same tab never sees them.
  function pairKey() {
    var form = labelForm();
    var field = form && form.querySelector("input[name=pair]");
    return field ? panel().getAttribute("data-labeler") + ":" + field.value : null;
  }

  // Shortcuts must never eat characters the labeler is typing.
  function isTyping(element) {
    if (!element || !element.tagName) return false;
    if (element.isContentEditable) return true;
    var tag = element.tagName;
    if (tag === "TEXTAREA" || tag === "SELECT") return true;
    return tag === "INPUT" && TEXT_INPUTS.indexOf(element.type) !== -1;
  }

  function focusPanel() {
    var p = panel();
    if (!p) return;
    var target = p.querySelector("#panel-error") || p.querySelector("#pair-heading");
    if (target) target.focus({ preventScroll: false });
  }

  // Polite, and emptied first: a screen reader says a repeated text only when the region changes.
  function announceStatus(text) {
    var status = document.getElementById("label-status");
    if (!status) return;
    status.textContent = "";
    window.setTimeout(function () { status.textContent = text; }, 100);
  }

  function textOf(selector) {
    var element = panel().querySelector(selector);
    return element ? element.textContent.replace(/\s+/g, " ").trim() : "";
  }

  // What a screen reader user needs after a swap that brought a pair (or the end of the queue): the focus goes to
  // the heading, which reads the same for every pair, so the region says what happened and where they stand.
  function announcePanel() {
    if (panel().querySelector("#panel-error")) return;  // the error has the focus and says it all
    var parts = [textOf(".notice"), labelForm() ? "Next pair shown." : textOf("#pair-heading") + ".",
                 textOf(".progress label")];
    announceStatus(parts.filter(Boolean).join(" "));
  }

  // A problem the panel itself cannot show (the server failed, or answered with another page): shown at the top
  // of the panel, which keeps the pair and what was typed, and focused so that it is read out.
  // `elt` is the element whose request failed: a skip that failed says so, rather than that an answer was lost.
  function showProblem(text, elt) {
    var p = panel();
    if (!p) return;
    var old = p.querySelector("#panel-error");
    if (old) old.remove();
    var box = document.createElement("div");
    box.className = "error";
    box.id = "panel-error";
    box.setAttribute("role", "alert");
    box.tabIndex = -1;
    var strong = document.createElement("strong");
    strong.textContent = elt && elt.closest && elt.closest(".skip-form") ? "Not skipped:" : "Not saved:";
    box.appendChild(strong);
    box.appendChild(document.createTextNode(" " + text + " "));
    var reload = document.createElement("a");
    reload.href = window.location.pathname;
    reload.textContent = "Reload the page";
    box.appendChild(reload);
    p.insertBefore(box, p.firstChild);
    box.focus();
  }

  function resetTimer() {
    shownAt = performance.now();
  }

  // What the labeler gave for a pair, kept until the pair is answered: a reload (after the session ended or the
  // page failed) brings back the rationale, flags and strength instead of an empty form.
  function saveDraft(form) {
    var checked = function (name) {
      return Array.prototype.map.call(form.querySelectorAll("input[name=" + name + "]:checked"),
                                      function (input) { return input.value; });
    };
    var draft = {pair: pairKey(), rationale: form.querySelector("#rationale").value, flags: checked("flags"),
                 strength: checked("strength")};
    try {
      window.sessionStorage.setItem(DRAFT_KEY, JSON.stringify(draft));
    } catch (error) { /* storage full or blocked: nothing to keep */ }
  }

  function loadDraft() {
    try {
      return JSON.parse(window.sessionStorage.getItem(DRAFT_KEY) || "null");
    } catch (error) {
      return null;
    }
  }

  function dropDraftUnlessFor(pair) {
    var draft = loadDraft();
    if (draft && draft.pair !== pair) {
      try { window.sessionStorage.removeItem(DRAFT_KEY); } catch (error) { /* nothing kept */ }
    }
  }

  function restoreDraft() {
    var form = labelForm();
    var draft = loadDraft();
    dropDraftUnlessFor(pairKey());
    if (!form || !draft || draft.pair !== pairKey()) return;
    var rationale = form.querySelector("#rationale");
    // The server's values win: they are there when it refused the answer and sent back what was typed.
    if (rationale.value || form.querySelector("input[name=flags]:checked, input[name=strength]:checked")) return;
    rationale.value = draft.rationale || "";
    form.querySelectorAll("input[name=flags], input[name=strength]").forEach(function (input) {
      var chosen = input.name === "flags" ? draft.flags : draft.strength;
      input.checked = (chosen || []).indexOf(input.value) !== -1;
    });
  }

  // Capture phase: runs before htmx reads the form, and before a plain submit when htmx is not loaded.
  document.addEventListener("submit", function (event) {
    var field = event.target.querySelector && event.target.querySelector("[data-time-ms]");
    if (field) field.value = String(Math.min(TIME_MS_MAX, Math.max(0, Math.round(performance.now() - shownAt))));
    if (event.target === labelForm()) saveDraft(event.target);
  }, true);

  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    var p = panel();
    if (!p) return;
    if (isTyping(event.target)) {
      if (event.key === "Escape" && p.contains(event.target)) {
        event.preventDefault();
        event.target.blur();
        focusPanel();
      }
      return;
    }
    // Enter on a strength radio or a flag box would submit the form with its first button, "Left is better":
    // an answer the labeler never gave. Answers come from their own keys and buttons only.
    if (event.key === "Enter" && event.target.tagName === "INPUT" && event.target.form === labelForm()) {
      event.preventDefault();
      return;
    }
    if (event.repeat) return;
    var key = (event.key || "").toLowerCase();
    if (key === "g") {
      var guidelines = document.getElementById("guidelines");
      if (guidelines) {
        event.preventDefault();
        guidelines.open = !guidelines.open;
        guidelines.querySelector("summary").focus();
      }
      return;
    }
    if (!/^[a-z0-9]$/.test(key)) return;
    var target = p.querySelector('[data-key="' + key + '"]');
    if (!target || target.disabled) return;
    event.preventDefault();
    if (target.tagName === "TEXTAREA") {
      target.focus();
    } else if (target.type === "radio") {
      // Pressing the key of the selected strength again clears it.
      target.checked = !target.checked;
      target.focus();
    } else if (performance.now() >= settledAt) {
      target.click();
    }
  });

  document.addEventListener("htmx:beforeSwap", function (event) {
    if (event.detail.target !== panel() || !event.detail.shouldSwap) return;
    pairBeforeSwap = pairKey();
    // Every answer for the panel holds its heading; anything else (the CSRF failure page after a login in another
    // tab, a 404 page for a project left meanwhile) would replace the pair and the keyboard's focus with a page.
    if (event.detail.xhr.responseText.indexOf('id="pair-heading"') === -1) {
      event.detail.shouldSwap = false;
      var status = event.detail.xhr.status;
      showProblem(status === 403 ? "your session changed (a log-out or log-in in another tab?)."
                                 : "the server answered with an unexpected page (" + status + ").", event.detail.elt);
    }
  });

  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target !== panel()) return;
    settledAt = performance.now() + SETTLE_MS;
    // The time to answer counts from when the pair was first shown, across a refused attempt.
    if (pairBeforeSwap !== pairKey()) resetTimer();
    dropDraftUnlessFor(pairKey());
    focusPanel();
    announcePanel();
  });

  document.addEventListener("htmx:sendError", function (event) {
    showProblem("the server could not be reached; please try again.", event.detail.elt);
  });

  document.addEventListener("htmx:responseError", function (event) {
    showProblem("the server failed (" + event.detail.xhr.status + "); please try again.", event.detail.elt);
  });

  // A page restored from the back/forward cache shows a pair that may have been answered since: ask the server
  // for the labeler's current one (the page is also sent with no-store, so most browsers never keep it).
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) {
      window.location.reload();
      return;
    }
    resetTimer();
  });
  document.addEventListener("DOMContentLoaded", function () {
    restoreDraft();
    if (document.getElementById("panel-error")) focusPanel();
  });
})();
