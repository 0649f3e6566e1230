// diffbench report pages: sortable, filterable tables and an image lightbox (no dependencies).
(function () {
  "use strict";

  // Cells are found by column name (data-col) where the header has one, since a skipped or
  // failed row of the run report spans its metric columns with one cell holding the reason;
  // by position otherwise.
  function cellValue(row, column, numeric) {
    const cell = typeof column === "number" ? row.cells[column] : row.querySelector('td[data-col="' + column + '"]');
    const raw = !cell ? "" : cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
    if (!numeric) return raw.toLowerCase();
    return raw === "" ? NaN : Number(raw);
  }

  function sortBy(table, th) {
    const column = th.dataset.col || Array.prototype.indexOf.call(th.parentNode.children, th);
    const numeric = th.dataset.type === "num";
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th[aria-sort]").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      const x = cellValue(a, column, numeric), y = cellValue(b, column, numeric);
      if (numeric) {  // empty cells (skipped, failed) always last
        if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
        return ascending ? x - y : y - x;
      }
      return ascending ? x.localeCompare(y) : y.localeCompare(x);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }

  function applyFilters(bar, table) {
    const selects = Array.from(bar.querySelectorAll("select[data-filter]"));
    const search = bar.querySelector("input[data-search]");
    const needle = search ? search.value.trim().toLowerCase() : "";
    let shown = 0;
    Array.from(table.tBodies[0].rows).forEach(function (row) {
      const visible = selects.every(function (s) { return !s.value || row.dataset[s.dataset.filter] === s.value; })
        && (!needle || row.textContent.toLowerCase().indexOf(needle) >= 0);
      row.hidden = !visible;
      shown += visible;
    });
    const count = bar.querySelector("[data-count]");
    if (count) count.textContent = shown + " of " + table.tBodies[0].rows.length + " shown";
  }

  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th:not(.nosort)").forEach(function (th) {
      th.addEventListener("click", function () { sortBy(table, th); });
    });
  });

  document.querySelectorAll(".filters[data-table]").forEach(function (bar) {
    const table = document.getElementById(bar.dataset.table);
    bar.addEventListener("input", function () { applyFilters(bar, table); });
    applyFilters(bar, table);
  });

  const lightbox = document.getElementById("lightbox");
  if (lightbox) {
    document.querySelectorAll("td.thumb img, .gallery img").forEach(function (img) {
      img.addEventListener("click", function () {
        lightbox.querySelector("img").src = img.src;
        lightbox.hidden = false;
      });
    });
    lightbox.addEventListener("click", function () { lightbox.hidden = true; });
    document.addEventListener("keydown", function (e) { if (e.key === "Escape") lightbox.hidden = true; });
  }
})();
