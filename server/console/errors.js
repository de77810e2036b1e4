// Loaded first, as a classic script: keeps every uncaught error, unhandled rejection and
// console.error of the page in window.__consoleErrors (the browser test reads it) and shows it.
"use strict";
window.__consoleErrors = [];
(function () {
  function record(message) {
    window.__consoleErrors.push(String(message));
    var status = document.getElementById("status");
    if (status) {
      var div = document.createElement("div");
      div.className = "error";
      div.setAttribute("role", "alert");
      div.textContent = "Console error: " + message;
      status.replaceChildren(div);
    }
  }
  window.addEventListener("error", function (e) {
    record(e.message || (e.target && e.target.src ? "failed to load " + e.target.src : "error"));
  }, true);
  document.addEventListener("securitypolicyviolation", function (e) {
    record("Content-Security-Policy refused " + e.violatedDirective + " (" + (e.blockedURI || "inline") + ")");
  });
  window.addEventListener("unhandledrejection", function (e) {
    var r = e.reason;
    if (r && r.name === "AbortError") return;
    record(r && r.message ? r.message : r);
  });
  var original = console.error;
  console.error = function () {
    record(Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
})();
