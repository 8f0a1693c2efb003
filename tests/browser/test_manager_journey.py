"""A manager's journey in Chromium: import with a bad line, train a tiny reward model through the real worker,
read its charts, deploy it, and download an export that `datasets` loads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from labeling.models import Membership, Pair
from rewards.models import RewardModel, TrainingRun
from tests.browser.conftest import login, requires_chromium
from tests.factories import ProjectFactory, UserFactory
from tests.rewards.factories import labeled_pairs

pytestmark = [requires_chromium, pytest.mark.django_db(transaction=True)]

HH_SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "hh-sample.jsonl"
# Long enough for the polling list to see a tiny model through a few dozen steps on a slow CI machine.
TRAINING_TIMEOUT_MS = 180_000


def _manager_of(project):
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.MANAGER)
    return user


def _hh_file_with_a_bad_line(tmp_path: Path) -> tuple[Path, int]:
    good = [line for line in HH_SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()][:4]
    bad_line = 3
    lines = [*good[:bad_line - 1], '{"chosen": "only one side"', *good[bad_line - 1:]]
    path = tmp_path / "hh-upload.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, bad_line


def test_a_manager_imports_trains_watches_and_deploys_a_reward_model(page, shot, live_server, tmp_path,
                                                                       training_worker):
    from tests.rewards.tiny import tiny_reward_model

    project = ProjectFactory()
    manager = _manager_of(project)
    base = tiny_reward_model(tmp_path / "base")
    upload, bad_line = _hh_file_with_a_bad_line(tmp_path)

    login(page, shot, username=manager.username, next_path=f"/dashboard/{project.slug}/")
    shot("project")
    page.locator("#import-file").set_input_files(str(upload))
    page.locator("#import-format").select_option("hh")
    page.get_by_role("button", name="Import").click()
    report = page.locator("#import-report")
    expect(report).to_contain_text("5 lines read")
    expect(report).to_contain_text("1 bad lines")
    rows = report.locator("tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td").first).to_have_text(str(bad_line))
    shot("import-report")
    assert Pair.objects.filter(project=project).count() == 4
    # More decided pairs so the run has a train and a held-out split worth the name.
    labeled_pairs(project, count=8)

    page.get_by_role("link", name="Training runs and reward models").click()
    form = page.locator("details.kind-form[open] form").filter(has=page.locator('input[name=kind][value="reward"]'))
    form.locator("#reward-base_model").fill(str(base))
    form.locator("#reward-learning_rate").fill("0.01")
    form.locator("#reward-num_train_epochs").fill("3")
    form.locator("#reward-per_device_train_batch_size").fill("1")
    form.locator("#reward-max_length").fill("64")
    shot("start-form")
    form.get_by_role("button", name="Start reward model run").click()
    page.wait_for_url("**/dashboard/runs/*/")
    run = TrainingRun.objects.get(project=project)
    assert run.base_model == str(base) and run.created_by == manager
    assert run.hyperparameters["learning_rate"] == 0.01 and run.hyperparameters["num_train_epochs"] == 3
    assert run.hyperparameters["per_device_train_batch_size"] == 1 and run.hyperparameters["max_length"] == 64

    # The runs list polls itself with htmx while the run is queued or running; no reload happens here.
    page.get_by_role("link", name="Training", exact=True).click()
    row = page.locator(f'#training-runs tr[data-run="{run.pk}"]')
    expect(row).to_be_visible()
    # Three epochs of a few dozen steps keep the run busy for seconds, so the list is first seen unfinished.
    expect(row.locator(".status")).to_have_class(re.compile(r"status-(queued|running)"))
    expect(page.locator("#training-runs")).to_have_attribute("hx-get", f"/dashboard/{project.slug}/training/runs/")
    shot("runs-list-active")
    page.evaluate("window.__sameDocument = true")
    expect(row.locator(".status-succeeded")).to_be_visible(timeout=TRAINING_TIMEOUT_MS)
    assert page.evaluate("window.__sameDocument") is True
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    expect(row.locator("progress")).to_have_attribute("value", str(run.total_steps))
    expect(row).to_contain_text(f"step {run.total_steps} of {run.total_steps}")
    expect(page.locator("#training-runs")).not_to_have_attribute("hx-get", re.compile(".*"))
    shot("runs-list-succeeded")

    row.get_by_role("link", name=f"Run {run.pk}").click()
    canvas = page.locator("#chart-loss")
    expect(canvas).to_be_visible()
    page.wait_for_function("() => window.Chart && Chart.getChart(document.getElementById('chart-loss'))")
    points = page.evaluate(
        "() => Chart.getChart(document.getElementById('chart-loss')).data.datasets.map(d => d.data.length)")
    assert points and all(count >= 1 for count in points)
    box = canvas.bounding_box()
    assert box is not None and box["width"] > 0 and box["height"] > 0
    loss_rows = page.locator("#loss-heading ~ details table tbody tr")
    assert loss_rows.count() >= 1
    shot("run-page")

    model = RewardModel.objects.get(training_run=run)
    assert not model.is_deployed
    page.get_by_role("button", name=f"Deploy reward model v{model.version}").click()
    expect(page.get_by_text(f"Reward model v{model.version} is now deployed.")).to_be_visible()
    shot("deployed")
    model.refresh_from_db()
    assert model.is_deployed and model.deployed_at is not None


def test_the_export_link_downloads_a_file_that_datasets_loads(page, shot, live_server, tmp_path):
    from datasets import load_dataset

    project = ProjectFactory()
    manager = _manager_of(project)
    pairs = labeled_pairs(project, count=4)

    login(page, shot, username=manager.username, next_path=f"/dashboard/{project.slug}/")
    shot("project")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="trl", exact=True).click()
    download = download_info.value
    assert download.suggested_filename == f"{project.slug}-trl.jsonl"
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(pairs)

    dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    assert dataset.num_rows == len(pairs)
    expected_chosen = {pair.response_a.text for pair in pairs}
    chosen = {json.dumps(row["chosen"]) for row in dataset}
    assert all(any(text in item for item in chosen) for text in expected_chosen)
