// A form marked data-submit-once (start, cancel, deploy) is sent once: a double click would otherwise post it
// twice (two identical runs queued, or "already cancelled" shown for a cancel that worked). A page shown again
// from the back-forward cache may send its forms again.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.matches || !form.matches("form[data-submit-once]")) { return; }
    if (form.getAttribute("data-submitting")) { event.preventDefault(); return; }
    form.setAttribute("data-submitting", "true");
  });
  window.addEventListener("pageshow", function () {
    document.querySelectorAll("form[data-submitting]").forEach(function (form) {
      form.removeAttribute("data-submitting");
    });
  });
})();
