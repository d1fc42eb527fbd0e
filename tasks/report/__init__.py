"""The report: a committed run's tables and run.json -> view models -> figures -> HTML and PDF.

- ``inputs``: reads the run (its tables, run.json as a ``RunRecord``, the feature-view index);
- ``context``: picks the images the report shows and builds every section's view from
  ``overview`` (cover, findings, unreadable images, appendix), ``classes`` (per-class table,
  confusion matrix, calibration, slices), ``examples`` (image strips: evidence, failure
  gallery, layer by layer), ``methods`` (methods run, sanity check, faithfulness, feature
  views), ``impressions`` (class impressions) and ``trends`` (runs of the same series);
- ``figures``: the picture files (the ``Painter``'s thumbnails and overlays, the charts);
- ``formatting``: cells and numbers as text (also the template's filters);
- ``render``: the Jinja2 template, the inlined stylesheet, the PDF, ``render_report``.
"""
