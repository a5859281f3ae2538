// The console's own script: check JSON fields before a form is sent, confirm dangerous forms.
"use strict";

function jsonProblem(form) {
  for (const field of form.querySelectorAll("textarea[data-json]")) {
    const text = field.value.trim();
    if (!text) continue;
    try {
      JSON.parse(text);
    } catch (error) {
      const label = form.querySelector(`label[for="${field.id}"]`);
      return `${label ? label.textContent : field.name} is not valid JSON: ${error.message}`;
    }
  }
  return null;
}

function showProblem(form, message) {
  let box = form.querySelector(".client-problem");
  if (!box) {
    box = document.createElement("p");
    box.className = "client-problem error";
    box.setAttribute("role", "alert");
    form.querySelector("button[type=submit]").before(box);
  }
  box.textContent = message;
}

function clearProblem(form) {
  const box = form.querySelector(".client-problem");
  if (box) box.remove();
}

// htmx forms: refuse before the request leaves the page.
document.addEventListener("htmx:confirm", (event) => {
  const form = event.target.closest("form");
  if (!form || event.target !== form) return;
  const problem = jsonProblem(form);
  if (problem) {
    event.preventDefault();
    showProblem(form, problem);
    return;
  }
  clearProblem(form);
  const dangerous = form.querySelector("[data-dangerous]");
  if (dangerous) {
    event.preventDefault();
    if (window.confirm(dangerous.getAttribute("data-dangerous"))) {
      dangerous.value = "yes";
      event.detail.issueRequest(true);
      dangerous.value = "";
    }
  }
});

// Plain forms (without htmx): the same check, and data-confirm.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.hasAttribute("hx-post")) return;
  const problem = jsonProblem(form);
  if (problem) {
    event.preventDefault();
    showProblem(form, problem);
    return;
  }
  const question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) event.preventDefault();
});

// A refused action's reason (4xx/5xx) is shown where its result would have gone.
document.addEventListener("htmx:beforeSwap", (event) => {
  if (event.detail.xhr.status >= 400) {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});
