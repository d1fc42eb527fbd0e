"""Findings: flags of likely dataset bias and failure modes, computed with pandas over a run's tables.

Start at ``compute``: ``compute_findings(FindingInputs(...), Thresholds())`` returns the
``findings`` table. ``finding`` holds the typed records (``Finding``, ``Detector``),
``inputs`` what the detectors read, ``registry`` every detector in listing order, and each
detector is one module named by its kind (``confident_error``, ``colour_shortcut``, ...).
``thresholds`` holds every threshold, ``stats`` the proportion intervals, ``fixed_location``
the model probes behind ``attention_fixed_location``, ``calibration`` and ``metrics`` the
run's reliability and headline numbers.
"""
