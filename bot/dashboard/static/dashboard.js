// dallebot dashboard: live counters. Loaded as a file (the CSP forbids inline script); it only ever
// sets textContent, never HTML.
(function () {
  "use strict";
  const box = document.getElementById("counters");
  if (!box) return;
  const every = Math.max(250, parseInt(box.dataset.refreshMs || "3000", 10));
  async function refresh() {
    try {
      const r = await fetch("/api/counters", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 401) {  // the session ended: log in again, then come back to this page
        window.location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
        return;
      }
      if (r.ok) {
        const data = await r.json();
        for (const el of box.querySelectorAll("[data-counter]")) {
          const key = el.dataset.counter;
          if (Object.prototype.hasOwnProperty.call(data, key)) el.textContent = String(data[key]);
        }
        box.dataset.updatedAt = String(Date.now());
      }
    } catch (e) {
      // the server is restarting or unreachable: try again at the next tick
    }
    window.setTimeout(refresh, every);
  }
  window.setTimeout(refresh, every);
})();
