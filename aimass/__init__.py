"""AI Mass: streaming real-time IoT analytics, one import namespace in three layers.

- ``aimass.core``: the foundation (configuration, data contract, process and server control,
  store access). It imports no stage and no command.
- ``aimass.streams``, ``aimass.agents``, ``aimass.models``, ``aimass.rules``: the stages (the
  repository's top-level folders of those names). They import the foundation and each other.
- The modules directly in ``aimass`` (``cli``, ``demo``, ``backtest``, ``query``, ``grafana``,
  ``receiver``): the commands. They may import anything below them.

``tests/test_layers.py`` fails when a lower layer imports a higher one.
"""
