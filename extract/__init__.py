__all__ = ["actor", "checkpoint", "cli", "detector_config", "detector_eval", "detector_train", "inspect", "job",
           "job_cli", "job_config", "legacy", "losses", "manifest", "modules", "postprocess", "ray_local", "stages",
           "vinvl", "writer"]
