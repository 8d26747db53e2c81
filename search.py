"""Entry point of the layer search: ``python search.py [key=value ...]`` (Hydra composes conf/search.yaml)."""
import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> None:
    from pipelines.checks import ConfigError
    from pipelines.search.driver import run_search  # after Hydra has parsed the command line: --help stays fast
    from pipelines.search.engine import EngineError
    from tasks.common.datasets import DatasetError

    try:
        run_search(cfg)
    except (ConfigError, EngineError, DatasetError) as e:  # bad input: the message says what to change
        log.error("%s: %s", type(e).__name__, e)  # a real crash keeps its traceback
        sys.exit(1)


if __name__ == "__main__":
    main()
