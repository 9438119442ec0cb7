"""The front door: the ``sendtime`` command line (``cli``) and the end-to-end demo
(``demo``). No room imports it."""
