"""The layer search (Liu et al. 2020): layers of evonorm.space evolved on a proxy task, in small modules split as
AutoML-Zero splits its search:

- ``mutator``: random layer graphs and their mutation (the algorithm's variation), per series (b / s)
- ``fingerprint``: the static check and the functional-equivalence fingerprint (the cache's key)
- ``proxy``: the proxy data and the anchor classifiers, and their training
- ``evaluator``: the rejection protocols, cheapest first, and the proxy scores (runs in a Ray worker)
- ``evolution``: aging evolution with Pareto tournaments, and random search
- ``history``: ``history.jsonl``, one line per finished evaluation, and the state a resumed search rebuilds
- ``engine``: Ray (local or a cluster): asynchronous evaluations, retries, failures
- ``leaderboard``: leaderboard.md/.csv, pareto.png, progress.png and the evolved layers' norm configs
- ``driver``: the search itself (``python search.py``), from the config to the outputs

None imports ``pipelines.run`` or ``pipelines.sweep``.
"""
