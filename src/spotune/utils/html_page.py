"""Pieces of spotune's static HTML pages (the evaluation report, the run page)."""

from __future__ import annotations

# Marks images that failed to load (a moved or incomplete folder) and records their natural widths, so a
# reader - or a headless browser - can see that the page rendered whole. The page holds an element with
# id "image-status" that gets data-loaded / data-total and a sentence.
IMAGE_STATUS_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images), ok = 0;
  images.forEach(function (im) {
    im.setAttribute('data-natural-width', im.naturalWidth);
    if (im.complete && im.naturalWidth > 0) { ok += 1; } else { im.classList.add('broken'); }
  });
  var status = document.getElementById('image-status');
  status.setAttribute('data-loaded', ok);
  status.setAttribute('data-total', images.length);
  status.textContent = ok === images.length ? 'all ' + ok + ' images loaded'
                                             : (images.length - ok) + ' of ' + images.length + ' images failed to load';
});
"""
