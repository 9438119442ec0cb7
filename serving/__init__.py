"""What the scheduler and the nightly job use: the champions, loaded once
(``predictor``, ``models``), one scoring core (``core``) that turns a feature snapshot
into every asked user's numbers, the nightly refresh that writes and publishes tags
(``refresh``, ``tagstore``), the answer to ``/recommend`` (``recommend``), live reloads
(``live``) and the BentoML service (``service``). Never imports ``training``.
"""
