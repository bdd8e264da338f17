import json
import math

import pytest

from poetlm.train.report import ReportError, load_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root, dirname, config, *, summary=None, spectrum=None, probe=False,
             steps=4, final_ppl=30.0, extra_metrics=""):
    """A run directory like the training loop writes, with predictable numbers."""
    d = root / dirname
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    lines = []
    for step in range(1, steps + 1):
        rec = {"step": step, "tokens": step * 1000, "loss": 5.0 - step * 0.5,
               "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 * step,
               "peak_mem_mb": 100.0 + step}
        if probe:
            rec.update(q_norm=1.0, orth_err=1e-6, probe_cos=0.9 + step * 0.01, spectrum_drift=2e-6 * step)
        lines.append(json.dumps(rec))
        if step % 2 == 0:
            ppl = final_ppl * (2 if step < steps else 1)
            lines.append(json.dumps({"step": step, "tokens": step * 1000,
                                     "val_loss": math.log(ppl), "val_ppl": ppl}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra_metrics)
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if spectrum is not None:
        (d / "spectrum.json").write_text(json.dumps(spectrum))
    return d


def summary(method, params, ppl, tps, mem, tokens):
    return {"method": method, "trainable_params": params * 2,
            "block_linear_trainable_params": params, "final_val_ppl": ppl,
            "tokens_per_s": tps, "peak_mem_mb": mem, "total_tokens": tokens,
            "steps": 4}


SPECTRUM = {"layer": "model.layers.0.mlp.down_proj",
            "initial": [4.0, 2.0, 1.0, 0.5], "final": [5.0, 2.5, 1.1, 0.4]}


@pytest.fixture
def three_runs(tmp_path):
    bs = make_run(tmp_path, "bs", {"name": "poet-bs", "method": "poet",
                                   "poet": {"variant": "bs", "block_size": 256}},
                  summary=summary("poet", 9_660_000, 31.25, 12345.6, 2048.0, 4_000_000),
                  spectrum=SPECTRUM, probe=True)
    fs = make_run(tmp_path, "fs", {"method": "poet",
                                   "poet": {"variant": "fs", "fraction": 0.5}},
                  summary=summary("poet", 4_830_000, 33.5, 15000.0, 1900.0, 4_000_000),
                  probe=True)
    adamw = make_run(tmp_path, "adamw", {"name": "baseline", "method": "adamw"},
                     summary=summary("adamw", 19_320_000, 29.75, 20000.0, 3000.0, 4_000_000),
                     spectrum=SPECTRUM)
    return [bs, fs, adamw]


def table_row(report_text, name):
    rows = [line for line in report_text.splitlines() if line.startswith(f"| {name}")]
    assert len(rows) == 1, report_text
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_labels_and_names(three_runs):
    bs, fs, adamw = (load_run(d) for d in three_runs)
    assert (bs.name, bs.label) == ("poet-bs", "POET-BS b=256")
    assert (fs.name, fs.label) == ("fs", "POET-FS β=0.5")  # name defaults to dir
    assert (adamw.name, adamw.label) == ("baseline", "AdamW")
    assert load_run(make_run(three_runs[0].parent, "mu", {"method": "muon"})).label == "Muon"
    paper = {"method": "poet-paper", "poet": {"variant": "bs", "block_size": 32}}
    assert load_run(make_run(three_runs[0].parent, "pp", paper)).label == "POET-paper-BS b=32"
    assert len(bs.train) == 4 and len(bs.eval) == 2
    assert bs.spectrum["layer"] == SPECTRUM["layer"] and fs.spectrum is None


def test_report_table_and_plots(three_runs, tmp_path):
    out = tmp_path / "out" / "nested"
    report = write_report(three_runs, out)
    assert report == out / "report.md"
    text = report.read_text(encoding="utf-8")

    assert table_row(text, "poet-bs") == [
        "poet-bs", "POET-BS b=256", "9.66M", "31.25", "12,346", "2,048", "4.00M", "8.0e-06"]
    assert table_row(text, "fs") == [
        "fs", "POET-FS β=0.5", "4.83M", "33.50", "15,000", "1,900", "4.00M", "8.0e-06"]
    assert table_row(text, "baseline") == [
        "baseline", "AdamW", "19.32M", "29.75", "20,000", "3,000", "4.00M", "—"]
    assert "incomplete" not in text

    for name in ("loss.png", "val_ppl.png", "spectrum.png", "probe_cos.png"):
        png = out / name
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
        assert f"]({name})" in text


def test_plots_skipped_without_data(tmp_path):
    run = make_run(tmp_path, "a", {"method": "adamw"},
                   summary=summary("adamw", 1000, 10.0, 1.0, 1.0, 4000))
    out = tmp_path / "out"
    out.mkdir()
    (out / "probe_cos.png").write_bytes(b"stale")
    text = write_report([run], out).read_text(encoding="utf-8")
    assert (out / "loss.png").is_file() and "(loss.png)" in text
    for name in ("probe_cos.png", "spectrum.png"):
        assert not (out / name).exists()
        assert name not in text


def test_truncated_last_line_is_ignored(tmp_path):
    run = make_run(tmp_path, "killed", {"method": "adamw"},
                   extra_metrics='{"step": 5, "tokens": 5000, "lo')
    loaded = load_run(run)
    assert [r["step"] for r in loaded.train] == [1, 2, 3, 4]


def test_corrupt_lines_are_skipped_with_a_warning(tmp_path, capsys):
    run = make_run(tmp_path, "bad", {"method": "adamw"})
    path = run / "metrics.jsonl"
    lines = path.read_bytes().splitlines()
    lines[1] = b'{"step": 2, "loss": \xff\xfe}'  # not UTF-8
    lines[2] = b"{not json"
    path.write_bytes(b"\n".join(lines) + b"\n")
    loaded = load_run(run)
    assert [r["step"] for r in loaded.train] == [1, 3, 4] and len(loaded.eval) == 1
    assert "skipped 2 unreadable line(s)" in capsys.readouterr().err
    write_report([run], tmp_path / "out")


def test_missing_summary_is_incomplete(tmp_path):
    run = make_run(tmp_path, "partial", {"method": "poet",
                                         "poet": {"variant": "bs", "block_size": 64}},
                   probe=True, final_ppl=42.5)
    text = write_report([run], tmp_path / "out").read_text(encoding="utf-8")
    # Eval lines carry ppl 85.0 at step 2 and 42.5 at step 4; the last one wins.
    # Throughput is the median of 1000..4000, memory the max, tokens the max.
    assert table_row(text, "partial (incomplete)") == [
        "partial (incomplete)", "POET-BS b=64", "—", "42.50", "2,500", "104", "4.00K", "8.0e-06"]


def test_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not a poetlm run directory"):
        load_run(tmp_path / "empty")
    with pytest.raises(ReportError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_records_with_non_numeric_metrics_are_skipped_with_a_warning(tmp_path, capsys):
    run = make_run(tmp_path, "edited", {"method": "adamw"}, summary={"method": "adamw", "final_val_ppl": "low"},
                   extra_metrics='{"step": 5, "tokens": "20", "loss": 1.0}\n{"step": 6, "tokens": 6000, "loss": 1.0, '
                                 '"tokens_per_s": "fast"}\n{"step": 6, "tokens": 6000, "val_ppl": true}\n')
    text = write_report([run], tmp_path / "out").read_text(encoding="utf-8")
    assert "skipped 3 line(s) of" in capsys.readouterr().err
    loaded = load_run(run)
    assert [r["step"] for r in loaded.train] == [1, 2, 3, 4] and len(loaded.eval) == 2
    assert "with a non-numeric metric (line 7, 8, 9)" in capsys.readouterr().err
    assert table_row(text, "edited") == ["edited", "AdamW", "—", "30.00", "2,500", "104", "4.00K", "—"]  # ppl from metrics.jsonl


@pytest.mark.parametrize("damage", ['{"initial": [1, "a"]}', '{"final": 3}', "{not json"])
def test_a_damaged_spectrum_leaves_its_plot_out_with_a_warning(tmp_path, capsys, damage):
    run = make_run(tmp_path, "bad-spectrum", {"method": "poet"}, spectrum={})
    (run / "spectrum.json").write_text(damage)
    text = write_report([run], tmp_path / "out").read_text(encoding="utf-8")
    assert "spectrum.json" in capsys.readouterr().err and "spectrum.png" not in text
    assert "loss.png" in text


def test_an_output_path_that_cannot_be_a_directory_is_a_report_error(tmp_path):
    run = make_run(tmp_path, "r", {"method": "adamw"})
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ReportError, match=r"--out=.* cannot be made a directory .*; choose another --out"):
            write_report([run], out)
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_run_given_twice_is_one_row(three_runs, tmp_path, capsys):
    first = three_runs[0]
    again = first.parent / "." / first.name
    text = write_report([first, again, three_runs[1]], tmp_path / "out").read_text(encoding="utf-8")
    table_row(text, "poet-bs")  # exactly one row
    assert "given again" in capsys.readouterr().err


def test_a_comparison_never_replaces_a_runs_own_report(three_runs):
    a, b = three_runs[:2]
    (b / "report.md").write_text("b's own report")
    with pytest.raises(ReportError, match=r"--out .* is a run directory.*--out report"):
        write_report([a, b], b)
    with pytest.raises(ReportError, match="is a run directory"):
        write_report([a], b)
    assert (b / "report.md").read_text() == "b's own report"
    assert write_report([b], b).read_text(encoding="utf-8").startswith("# Training report")


def test_a_run_before_its_first_log_line_is_an_incomplete_row(three_runs, tmp_path):
    started = tmp_path / "started"
    (started / "checkpoints").mkdir(parents=True)
    (started / "config.json").write_text(json.dumps({"name": "started", "method": "adamw"}))
    text = write_report([three_runs[0], started], tmp_path / "out").read_text(encoding="utf-8")
    assert table_row(text, "started (incomplete)")[1] == "AdamW"
    with pytest.raises(ReportError, match="is a run directory"):  # and it is one, as --out
        write_report([three_runs[0]], started)


def test_runs_of_one_name_are_told_apart_by_their_directory(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_run(tmp_path / "a", "straight", {"name": "straight", "method": "poet"}, final_ppl=30.0)
    second = make_run(tmp_path / "b", "straight", {"name": "straight", "method": "poet"}, final_ppl=40.0)
    text = write_report([first, second], tmp_path / "out").read_text(encoding="utf-8")
    assert table_row(text, f"straight [{first}]")[3] == "30.00" and table_row(text, f"straight [{second}]")[3] == "40.00"


def test_runs_measured_on_other_tokens_get_a_note(tmp_path, capsys):
    data = {"data": "sotu", "tokenizer": None, "vocab_size": 4096, "seq_len": 128, "val_fraction": 0.05, "split_seed": None}
    a = make_run(tmp_path, "a", {"method": "poet", "seed": 0, "eval_tokens": 1024, "data": data})
    b = make_run(tmp_path, "b", {"method": "adamw", "seed": 0, "eval_tokens": 1024, "data": data})
    (tmp_path / "corpus.txt").write_text("text")
    b_config = json.loads((b / "config.json").read_text())
    b_config["data"]["data"] = str(tmp_path / "corpus.txt")
    (b / "config.json").write_text(json.dumps(b_config))
    a_config = json.loads((a / "config.json").read_text())
    a_config["data"]["data"] = str(tmp_path / "." / "corpus.txt")  # the same file, spelled otherwise
    (a / "config.json").write_text(json.dumps(a_config))
    same = write_report([a, b], tmp_path / "same").read_text(encoding="utf-8")
    assert "not comparable" not in same and "not comparable" not in capsys.readouterr().err
    c = make_run(tmp_path, "c", {"method": "muon", "seed": 1, "eval_tokens": 1024, "data": {**data, "vocab_size": 1024,
                                                                                  "data": str(tmp_path / "corpus.txt")}})
    text = write_report([a, c], tmp_path / "other").read_text(encoding="utf-8")
    note = ("these runs' validation perplexities are not comparable: they were measured on other tokens "
            "(data.vocab_size: 4096, 1024; the data split seed: 0, 1)")
    assert f"**Note:** {note}." in text and note in capsys.readouterr().err


@pytest.mark.parametrize("diverged", [False, True])
def test_the_loss_plot_goes_logarithmic_when_its_losses_span_more_than_tenfold(tmp_path, monkeypatch, diverged):
    """A diverged run's hundreds beside the others' few units; a normal run's losses stay on a linear axis."""
    import poetlm.train.report as report

    scales, save = {}, report._save

    def save_and_record(fig, ax, path):
        scales[path.name] = ax.get_yscale()
        return save(fig, ax, path)

    monkeypatch.setattr(report, "_save", save_and_record)
    steady = make_run(tmp_path, "steady", {"method": "adamw"}, summary=summary("adamw", 1000, 10.0, 1.0, 1.0, 4000))
    blowup = '{"step": 5, "tokens": 5000, "loss": 480.0}\n' if diverged else ""
    other = make_run(tmp_path, "other", {"method": "poet"}, extra_metrics=blowup,
                     summary=summary("poet", 1000, 10.0, 1.0, 1.0, 4000))
    out = tmp_path / "out"
    out.mkdir()
    write_report([steady, other], out)
    assert scales["loss.png"] == ("log" if diverged else "linear")


def test_runs_on_other_validation_tokens_of_one_config_get_a_note(tmp_path, capsys):
    """data.max_documents, or a data file edited between two runs, changes the tokens with the same settings."""
    data = {"data": "sotu", "vocab_size": 4096, "seq_len": 128}
    runs = [make_run(tmp_path, name, {"method": "poet", "seed": 0, "data": data}) for name in ("a", "b", "c")]
    for run, tokens in zip(runs, ("1" * 64, "1" * 64, "2" * 64)):
        (run / "data.json").write_text(json.dumps({"sha256_val": tokens, "tokenizer_hash": "t"}))
    assert "not comparable" not in write_report(runs[:2], tmp_path / "same").read_text(encoding="utf-8")
    text = write_report(runs[1:], tmp_path / "other").read_text(encoding="utf-8")
    assert "not comparable" in text and "the validation tokens (data.json's sha256_val" in text
    (runs[2] / "data.json").write_text("{damaged")  # only the note leans on it: the report goes on without it
    assert "not comparable" not in write_report(runs[1:], tmp_path / "damaged").read_text(encoding="utf-8")


def test_a_diverged_run_reads_inf_or_e_notation_and_its_plots_are_drawn(tmp_path):
    """A finished run's null final perplexity is an overflow, not a missing value: never an earlier finite one.
    Values near float's limit must not break the log axis (matplotlib overflowed drawing 6.7e288)."""
    huge = '{"step": 5, "tokens": 5000, "val_loss": 663.0, "val_ppl": 6.7e288}\n'
    overflowed = make_run(tmp_path, "overflowed", {"method": "adamw"}, extra_metrics=huge + '{"step": 6, "tokens": 6000, "val_loss": null, "val_ppl": null}\n',
                          summary={**summary("adamw", 1000, 10.0, 1.0, 1.0, 4000), "final_val_ppl": None})
    big = make_run(tmp_path, "big", {"method": "poet"}, extra_metrics=huge)  # no summary: read from the metrics
    text = write_report([overflowed, big], tmp_path / "out").read_text(encoding="utf-8")
    assert table_row(text, "overflowed")[3] == "inf"
    assert table_row(text, "big (incomplete)")[3] == "6.70e+288"
    assert "(val_ppl.png)" in text and (tmp_path / "out" / "val_ppl.png").read_bytes().startswith(PNG_MAGIC)


def test_a_metric_with_one_point_is_drawn_as_a_marker(tmp_path, monkeypatch):
    import poetlm.train.report as report

    lines = []
    monkeypatch.setattr(report, "_save", lambda fig, ax, path: lines.extend(ax.get_lines()) or path)
    run = make_run(tmp_path, "short", {"method": "poet-paper"},
                   extra_metrics='{"step": 5, "tokens": 5000, "loss": 2.0, "probe_cos": 0.5}\n')
    report._plot_probe_cos([load_run(run)], tmp_path / "probe.png")
    assert [line.get_marker() for line in lines] == ["o"]



def test_perplexities_print_as_numbers_a_reader_can_take_in():
    from poetlm.train.metrics import format_ppl

    assert [format_ppl(v, 3) for v in (53.4567, 999_999.0, 1.7e160, math.inf)] == ["53.457", "999999.000", "1.700e+160", "inf"]
