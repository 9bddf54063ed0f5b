/* In the page's head, before anything else: count every error (scripts, and images that fail
   to load), so that the checks on load (sort.js) can report them. */
window.__reportErrors = 0;
window.addEventListener('error', function () { window.__reportErrors += 1; }, true);
