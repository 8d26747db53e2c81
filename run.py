"""Entry point: ``python run.py task=classification norm=b0`` (Hydra composes conf/config.yaml)."""
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipelines.checks import REFUSALS, RunDirConflict  # after Hydra has parsed the command line: --help stays fast
    from pipelines.jobs import multirun_sweep_dir, refuse_job
    from pipelines.run import run

    try:
        run(cfg)
    except Exception as e:
        if multirun_sweep_dir() is None:
            if isinstance(e, REFUSALS) and os.environ.get("HYDRA_FULL_ERROR") != "1":
                log.error("%s: %s", type(e).__name__, e)  # a refusal says what to do: no traceback buries it
                sys.exit(1)
            raise
        # a sweep goes on: the job's results.json says why it failed, the report at the end and the sweep's exit
        # status count it. A refused dir (checked before the sweep started; a run begun there since) keeps the
        # other run's record
        if isinstance(e, RunDirConflict):
            refuse_job(e)
        else:
            log.exception("job failed; the sweep goes on")


if __name__ == "__main__":
    main()
