"""The flags of a run that are not part of its saved config, typed: with config.py's Config they are the whole
surface of `forge-ds train` and `forge-ds check`. cli.py builds the commands, their types, defaults and `--help`
from these two descriptions, and nowhere else.
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RunOptions(BaseModel):
    # coerce_numbers_to_str: fire turns `--output_dir=2024` into an int; a path is still a path.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True)

    config: Optional[str] = Field(None, description="a YAML/JSON config file, a preset (modularforge, cpu_demo) "
                                                    "or ModularForge's configs/default.yaml")
    deepspeed_config: str = Field("zero2", description="a shipped DeepSpeed config (zero0 zero0_autocast zero1 "
                                                       "zero2 zero3 zero3_offload), a JSON path, or auto (the "
                                                       "planner picks the stage; see forge-ds plan)")
    output_dir: Optional[str] = Field(None, description="run directory; default runs/<YYYYmmdd-HHMMSS> "
                                                        "(runs/slurm-<job id> under SLURM)")
    resume: Optional[str] = Field(None, description="continue from the newest complete checkpoint (bare --resume "
                                                    "or auto), or from a named one (a step-* tag or a path)")
    overwrite: bool = Field(False, description="replace a finished run in --output_dir")
    stop_after_steps: Optional[int] = Field(None, ge=1, description="end this invocation after N steps with a "
                                                                    "checkpoint; the schedule is unchanged")
    init_from: Optional[str] = Field(None, description="start from a shared_components.pt export (fresh experts, "
                                                       "optimizer and schedule)")
    allow_schedule_change: bool = Field(False, description="accept a changed max_steps/epochs_shared on resume")
    tensorboard_dir: Optional[str] = Field(None, description="TensorBoard event files; default <run dir>/tensorboard")
    peak_tflops: Optional[float] = Field(None, gt=0, allow_inf_nan=False,
                                         description="per-rank peak TFLOP/s for MFU when the GPU is not in the "
                                                     "built-in table")

    @field_validator("resume", mode="before")
    @classmethod
    def _bare_resume_means_auto(cls, value: Union[bool, str, None]):
        # fire passes a bare `--resume` as True and `--noresume` as False.
        return None if value in (None, False) else "auto" if value is True else value


class CheckOptions(RunOptions):
    world_size: Optional[int] = Field(None, ge=1, description="check the batch split for N ranks; default: this "
                                                              "launch's")
