/* Labeling page: keyboard shortcuts, time-to-answer measurement and focus handling after htmx swaps. */
(function () {
  "use strict";

  var shownAt = performance.now();
  var TEXT_INPUTS = ["text", "search", "email", "url", "tel", "password", "number"];

  function panel() {
    return document.getElementById("label-panel");
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

  function announce(text) {
    var live = document.getElementById("label-live");
    if (live) live.textContent = text;
  }

  function resetTimer() {
    shownAt = performance.now();
  }

  // Capture phase: runs before htmx reads the form, and before a plain submit when htmx is not loaded.
  document.addEventListener("submit", function (event) {
    var field = event.target.querySelector && event.target.querySelector("[data-time-ms]");
    if (field) field.value = String(Math.max(0, Math.round(performance.now() - shownAt)));
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
    } else {
      target.click();
    }
  });

  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target !== panel()) return;
    announce("");
    resetTimer();
    focusPanel();
  });

  document.addEventListener("htmx:sendError", function () {
    announce("The server could not be reached. Your answer was not saved; please try again.");
  });

  document.addEventListener("htmx:responseError", function (event) {
    announce("The server failed (" + event.detail.xhr.status + "). Your answer was not saved; please try again.");
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
    if (document.getElementById("panel-error")) focusPanel();
  });
})();
