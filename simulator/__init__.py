"""A room of its own for simulated data with known truth: the generator
(``simulator.generate``), the judge that scores tags against the truth
(``simulator.judge``), and the reference estimators that know the generator's own model
(``simulator.references``). The product never depends on it; tests, the demo, the
benchmarks and ``sendtime simulate``/``evaluate`` do.
"""
