"""Shared fixtures: compose configs with Hydra's compose API, shrink runs, run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mptrain.cli.register import register

CONF = Path(register())
REPO = Path(__file__).resolve().parent.parent
# Small and quiet: CPU, no progress bar or TensorBoard unless a test asks for them.
TINY = ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false"]


def compose_config(overrides: list[str] | None = None, config_path: Path = CONF):
    """The composed config, as `mptrain <overrides>` would see it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_path), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


def train(tmp_path: Path, overrides: list[str]) -> tuple[dict, Path]:
    """Run the recipe in this process on a composed config; return (summary, run_dir)."""
    from mptrain.config import validate
    from mptrain.train.recipe import run

    cfg = compose_config(TINY + overrides)
    validate(cfg)
    run_dir = tmp_path / "run"
    return run(cfg, run_dir), run_dir


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mptrain ARGS` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)  # the user's view: Hydra's short messages
    return subprocess.run([sys.executable, "-m", "mptrain", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Tests share a process, like Hydra multirun jobs: nothing global may leak between them."""
    m = torch.backends.cuda.matmul
    before = (torch.are_deterministic_algorithms_enabled(), m.allow_fp16_reduced_precision_reduction,
              m.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.benchmark, m.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    yield
    after = (torch.are_deterministic_algorithms_enabled(), m.allow_fp16_reduced_precision_reduction,
             m.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.benchmark, m.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    assert after == before, "a run leaked a global torch setting"


# The longest fast cases, as measured in a fresh clone (`make test`'s --durations: each 2 s or more, 2.6 min in
# all; then each 3 s or more of a later fresh clone's run, 3.3 min), run with the slow suite so that `make test`
# stays near 6 minutes on 2 cores; CI runs both.
LONG = {
    'tests/test_activation_checkpointing.py::test_a_run_with_checkpointed_blocks_trains_like_one_without',
    'tests/test_advise.py::test_directory_without_diagnostics_is_one_line_and_exit_2',
    'tests/test_advise.py::test_ordinary_task_is_safe_with_dynamic_scaling_and_a_torn_line_is_skipped',
    'tests/test_aliases.py::test_every_alias_gives_the_same_run_as_its_preset[transformer-engine]',
    'tests/test_bf16_pure.py::test_bf16_pure_run_holds_bf16_weights_and_state_with_fp32_norm_layers',
    'tests/test_bf16_pure.py::test_memory_per_param_by_hand',
    'tests/test_bf16_pure.py::test_stop_and_resume_is_bit_identical[kahan-sgd]',
    'tests/test_bf16_pure.py::test_stop_and_resume_is_bit_identical[stochastic-adamw]',
    'tests/test_checkpoint.py::test_bad_checkpoint_file_is_refused_and_nothing_is_overwritten[newer_format-format_version',
    'tests/test_checkpoint.py::test_bad_checkpoint_file_is_refused_and_nothing_is_overwritten[truncated-truncated',
    'tests/test_checkpoint.py::test_stop_and_resume_is_bit_identical[dynamic-extra1]',
    'tests/test_checkpoint.py::test_stop_and_resume_is_bit_identical[fp32-extra0]',
    'tests/test_checkpoint.py::test_stop_and_resume_is_bit_identical[master-extra2]',
    'tests/test_cli.py::test_default_run_reaches_95_percent_on_digits',
    'tests/test_configs.py::test_bad_override_fails_with_one_clear_message[optimizer.lr=-1-optimizer.lr=-1.0',
    'tests/test_configs.py::test_bad_override_fails_with_one_clear_message[trainer.batch_size=0-trainer.batch_size=0',
    'tests/test_data_defaults.py::test_num_workers_config_default_and_checks',
    'tests/test_diagnostics.py::test_report_on_a_directory_that_is_not_a_run',
    'tests/test_ema.py::test_a_decay_without_the_switch_is_refused_not_ignored',
    'tests/test_ema.py::test_under_master_weights_the_average_follows_the_fp32_masters',
    'tests/test_estimate.py::test_activations_are_one_micro_batchs_whatever_the_accumulation',
    'tests/test_estimate.py::test_ema_counts_its_fp32_copy',
    'tests/test_help.py::test_help_lists_each_group_its_purpose_and_only_the_real_choices',
    'tests/test_help.py::test_help_lists_the_everyday_presets_apart_from_aliases_and_the_papers_ablations',
    'tests/test_help.py::test_help_marks_the_current_choices',
    'tests/test_help.py::test_help_shows_a_users_own_config_dir_entries',
    'tests/test_hostile.py::test_a_run_that_applied_no_update_fails[ConstantLoss-fp32-the',
    'tests/test_hostile.py::test_compare_skips_a_damaged_line_and_a_truncated_summary_before_writing',
    'tests/test_loss_scaler.py::test_engine_resume_in_the_middle_of_a_hysteresis_run_is_bitwise',
    'tests/test_optim.py::test_low_bit_adamw_equals_torchaos_own_loop[adamwfp8-AdamWFp8]',
    'tests/test_plan.py::test_presets_produce_plans',
    'tests/test_plan.py::test_static_preset_with_dynamic_scaling_is_refused_and_touches_nothing',
    'tests/test_precision.py::test_accumulating_k_micro_batches_matches_one_big_batch[dynamic]',
    'tests/test_precision.py::test_accumulating_k_micro_batches_matches_one_big_batch[fp32]',
    'tests/test_precision.py::test_cuda_requested_without_gpu_fails_early',
    'tests/test_precision.py::test_default_scale_trajectory_equals_gradscaler_with_growth_events',
    'tests/test_precision.py::test_overflowing_step_is_skipped_bit_identically_and_backs_off[master]',
    'tests/test_precision.py::test_update_of_2_pow_minus_12_is_lost_without_master_weights',
    'tests/test_reliability.py::test_unwritable_metrics_or_summary_is_one_line_naming_the_file',
    'tests/test_resume_any_run.py::test_a_gan_run_resumes_and_eval_sample_export_accept_it',
    'tests/test_resume_any_run.py::test_every_built_in_model_resumes_where_it_stopped[gpt]',
    'tests/test_resume_any_run.py::test_every_built_in_model_resumes_where_it_stopped[mlp]',
    'tests/test_tokens.py::test_nanogpt_meta_pkl_gives_the_vocabulary_and_decodes_samples',
    'tests/test_use.py::test_export_ema_writes_the_shadow_in_the_models_dtype',
    'tests/test_wandb.py::test_offline_run_files_hold_the_config_every_metric_row_the_summary_and_the_plan',
    'tests/test_advise.py::test_verify_trains_at_the_runs_median_lr_not_its_schedules_tail',
    'tests/test_auto_time.py::test_a_target_without_the_format_says_why_it_is_chosen_for_no_layer',
    'tests/test_aliases.py::test_every_alias_gives_the_same_run_as_its_preset[16-mixed]',
    'tests/test_auto.py::test_auto_demotes_a_layer_when_the_channel_appears',
    'tests/test_auto.py::test_auto_resume_across_a_demotion_is_bitwise',
    'tests/test_checkpoint.py::test_bad_checkpoint_file_is_refused_and_nothing_is_overwritten[missing-does',
    'tests/test_checkpoint.py::test_config_changes_on_resume_are_logged',
    'tests/test_checkpoint.py::test_failed_save_stops_cleanly_with_the_previous_checkpoint_intact',
    'tests/test_cli.py::test_two_step_smoke_run_per_precision[dynamic]',
    'tests/test_cli.py::test_two_step_smoke_run_per_precision[fp32]',
    'tests/test_cli.py::test_two_step_smoke_run_per_precision[master]',
    'tests/test_conv_wgrad.py::test_training_with_the_forward_form_follows_native_training',
    'tests/test_cuda_path.py::test_gpt_trains_with_fp32_norms[bf16_pure]',
    'tests/test_cuda_path.py::test_gpt_trains_with_fp32_norms[master]',
    'tests/test_cuda_path.py::test_gpt_trains_with_fp32_norms[nomaster]',
    'tests/test_cuda_path.py::test_unlogged_steps_read_the_device_only_where_documented[bf16_pure]',
    'tests/test_cuda_path.py::test_unlogged_steps_read_the_device_only_where_documented[dynamic]',
    'tests/test_debug.py::test_mptrain_debug_overfit_drives_the_loss_to_about_zero',
    'tests/test_debug.py::test_overfit_drives_the_loss_to_about_zero',
    'tests/test_defaults.py::test_the_gpt_recipe_is_what_trains',
    'tests/test_diagnostics.py::test_diagnostics_off_adds_no_hooks_and_no_work',
    'tests/test_diagnostics.py::test_sampled_steps_write_rows_with_every_statistic',
    'tests/test_diagnostics.py::test_unsampled_steps_do_no_statistics',
    'tests/test_early_stopping.py::test_an_unchanged_resume_of_an_early_stopped_run_changes_no_file',
    'tests/test_early_stopping.py::test_stops_where_the_rule_says[val/loss-min-0.02]',
    'tests/test_ema.py::test_a_new_decay_on_resume_leaves_the_weights_and_is_recorded_for_the_average',
    'tests/test_fp8.py::test_rowwise_recipe_trains',
    'tests/test_hostile.py::test_bad_inputs_are_one_line_and_change_nothing[seed',
    'tests/test_hostile.py::test_resume_into_another_precision_continues_or_refuses[fp32-master]',
    'tests/test_hub_models.py::test_family_trains_in_each_precision[convnext-fp32]',
    'tests/test_hub_models.py::test_family_trains_in_each_precision[llama-fp32]',
    'tests/test_judge.py::test_case2_massive_channel_rules_out_fp16_and_names_the_layer',
    'tests/test_judge.py::test_case3_16bit_weights_use_the_runs_own_lost_updates[nomaster]',
    'tests/test_judge.py::test_shadow_does_not_change_training',
    'tests/test_models.py::test_dcgan_run_writes_sample_grids_and_losses',
    'tests/test_models.py::test_dcgan_trains_in_every_precision_mode[bf16]',
    'tests/test_models.py::test_dcgan_trains_in_every_precision_mode[noscale]',
    'tests/test_models.py::test_dcgan_trains_in_every_precision_mode[static]',
    'tests/test_optim.py::test_optimizer_by_target_takes_the_given_betas_eps_momentum_and_nesterov',
    'tests/test_sweeps.py::test_compare_on_a_directory_without_runs',
    # 2026-12-04: make test took 6:03; the two longest (30.7 s and 11.9 s)
    'tests/test_distributed_auto.py::test_ddp_plans_once_for_both_ranks_and_resumes_on_one',
    "tests/test_hostile.py::test_bad_inputs_are_one_line_and_change_nothing[gpt vocab smaller than the data's]",
}


# an entry cut inside its parameters ("...[optimizer.lr=-1-optimizer.lr=-1.0") names every case it begins
CUT = tuple(e for e in LONG if "[" in e and not e.endswith("]"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in LONG or item.nodeid.startswith(CUT):
            item.add_marker(pytest.mark.slow)
