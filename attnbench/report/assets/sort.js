/* The report's tables sort when a header is clicked (numbers as numbers). On load the page
   records on <body> how many images it holds, how many failed and how many errors were seen
   (data-ready: ok or broken); with #selftest in the address it also sorts a numeric column
   both ways and records whether the order came out right (data-sorted). */
(function () {
  function key(row, index) {
    var cell = row.cells[index];
    var text = cell ? cell.textContent.trim() : '';
    var value = parseFloat(text.replace(/[,×%]/g, ''));
    return isNaN(value) ? text.toLowerCase() : value;
  }
  function sortBy(th) {
    var table = th.closest('table'), body = table.tBodies[0];
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var dir = th.getAttribute('data-dir') === 'asc' ? 'desc' : 'asc';
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', dir);
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, index), y = key(b, index), c;
      if (typeof x === typeof y) { c = x < y ? -1 : (x > y ? 1 : 0); }
      else { c = typeof x === 'number' ? -1 : 1; }
      return dir === 'asc' ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  window.attnbenchSort = sortBy;
  document.addEventListener('click', function (e) {
    var th = e.target.closest ? e.target.closest('th.sortable') : null;
    if (th) { sortBy(th); }
  });
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
    var body = document.body;
    if (location.hash === '#selftest') {  // the tests: sort a numeric column both ways
      var th = document.querySelector('th.sortable[data-numeric]');
      if (th) {
        var index = Array.prototype.indexOf.call(th.parentNode.children, th);
        var column = function () {
          return Array.prototype.slice.call(th.closest('table').tBodies[0].rows)
            .map(function (r) { return key(r, index); })
            .filter(function (v) { return typeof v === 'number'; });
        };
        sortBy(th);
        var up = column();
        sortBy(th);
        var down = column();
        var ok = up.every(function (v, i) { return i === 0 || up[i - 1] <= v; })
              && down.every(function (v, i) { return i === 0 || down[i - 1] >= v; });
        body.setAttribute('data-sorted', ok ? 'ok' : 'wrong');
      }
    }
    body.setAttribute('data-images', String(images.length));
    body.setAttribute('data-broken-images', String(broken));
    body.setAttribute('data-errors', String(window.__reportErrors));
    body.setAttribute('data-ready', broken === 0 && window.__reportErrors === 0 ? 'ok' : 'broken');
  });
})();
