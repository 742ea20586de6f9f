"""adloop: a real-time streaming optimizer for ad creatives.

The design card's folders at the top of the repository install as subpackages
of this one (see ``[tool.setuptools.package-dir]`` in pyproject.toml)::

    adloop.schemas    wire records and their decoders          (pure)
    adloop.bandit     bandit maths and policies                (pure)
    adloop.generator  LLM variants, filters, CTR model         (models, no Kafka)
    adloop.streams    the roles on Kafka: ingest, worker, serving, loop, generator worker
    adloop.bench      simulators, replay and benchmarks        (above the product)
    adloop.cli        the composition root: the ``adloop`` command

Imports point down that list only: nothing in the product imports ``bench``,
and ``schemas``, ``bandit`` and ``generator`` import nothing from ``streams``.
"""

__version__ = "0.1.0"
