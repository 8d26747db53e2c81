"""Entry point: ``python run.py task=classification norm=b0`` (Hydra composes conf/config.yaml)."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipelines.run import run  # after Hydra has parsed the command line: --help stays fast

    run(cfg)


if __name__ == "__main__":
    main()
