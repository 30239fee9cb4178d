"""The panel's Gradio Blocks app: the runs under a root, one run's curves, sample grids, report and
config, refreshed by a timer while runs train in other processes; and a form to start and stop runs.

Every view is a plain function of (runs root, run name, ...) that returns data, so the same functions
serve the browser and ``gradio_client`` (API names ``runs``, ``run``, ``grid``, ``start``, ``stop``).
Names coming from the browser go through ``runs.run_dir``; a refused name or an unreadable run shows
as a message, never as an exception in the app.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no requests out

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from distill_core.methods.registry import methods  # noqa: E402
from distill_core.panel import runs  # noqa: E402
from distill_core.panel.jobs import LOG, TEACHER_FOLDER, Jobs, start_form, teacher_choices  # noqa: E402
from distill_core.sources import TEACHERS  # noqa: E402
from distill_core.train.previews import ROW_LABELS  # noqa: E402

TABLE_COLUMNS = ["run", "status", "method", "steps", "step / total", "ETA", "wall time", "note"]
REFRESH_S = 2.0
PLOT_HEIGHT = 320  # room for the legend under the plot
AUTO_INFO = "auto: the method and budget the benchmark found best at this step count (the line below says which); "


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _log_tail(run: Path, lines: int = 3) -> str:
    try:
        text = runs.run_file(run, LOG).read_text(errors="replace")
    except (OSError, runs.OutsideRoot):
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def summary(root: Path, jobs: Jobs, name: str) -> runs.RunSummary:
    """``runs.summarize`` plus what only this panel knows about the processes it started."""
    run = runs.run_dir(root, name)
    s = runs.summarize(run)
    if s.state == "unknown" and name in jobs.procs:
        code = jobs.exit_code(name)
        if code is None:
            s.state = "starting"
        elif code:
            s.state, s.error = "failed", f"exit status {code}: {_log_tail(run)}"
    return s


def runs_rows(root: Path, jobs: Jobs) -> list[list[str]]:
    """One row per run (``TABLE_COLUMNS``): status, method, steps, progress, ETA, wall time, and
    errors or problems."""
    rows = []
    for name in runs.list_runs(root):
        try:
            s = summary(root, jobs, name)
        except runs.OutsideRoot:  # removed or replaced between listing and reading
            continue
        except Exception as e:  # one unreadable run never hides the others
            rows.append([name, "unreadable", "", "", "", "", "", f"{type(e).__name__}: {e}"])
            continue
        note = "; ".join(filter(None, [s.error, *s.problems]))
        progress = f"{s.iteration} / {s.total}" if s.total else str(s.iteration)
        rows.append([name, s.state, s.method or "", s.steps or "", progress, _duration(s.eta_s),
                     _duration(s.wall_s), note])
    return rows


def update_label(index: str) -> str:
    """The legend of one update's curve: "step 2" for the exported network's student steps, "critic 0" for
    another network group's updates."""
    group, _, number = index.rpartition(":")
    return f"{group} {number}" if group else f"step {index}"


def _curves(records: list[dict], key: str, smoothing: float) -> pd.DataFrame:
    """Long-format frame (iter, value, series) of ``key`` per student step index, smoothed."""
    per_step: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for index, value in r[key].items():
            per_step.setdefault(index, []).append((r["iter"], value))
    frames = []
    for index in sorted(per_step, key=lambda k: (len(k), k)):
        iters, values = zip(*per_step[index])
        frames.append(pd.DataFrame(
            {"iter": iters, key: runs.smooth(list(values), smoothing), "student step": update_label(index)}
        ))
    return pd.concat(frames) if frames else pd.DataFrame({"iter": [], key: [], "student step": []})


def run_view(root: Path, jobs: Jobs, name: str, smoothing: float) -> tuple:
    """(note, loss frame, lr frame, grad-norm frame, report table, config) of one run."""
    empty = (pd.DataFrame({"iter": [], "loss": [], "student step": []}),
             pd.DataFrame({"iter": [], "lr": []}),
             pd.DataFrame({"iter": [], "grad_norm": [], "student step": []}),
             pd.DataFrame(), {})
    if not name:
        return ("No run selected.", *empty)
    try:
        run = runs.run_dir(root, name)
        s = summary(root, jobs, name)
    except runs.OutsideRoot as e:
        return (str(e), *empty)
    metrics, _ = runs.read_metrics(run)
    smoothing = min(max(float(smoothing or 0), 0.0), 0.99)
    records = metrics.records
    lr = pd.DataFrame({"iter": [r["iter"] for r in records if r["lr"] is not None],
                       "lr": [r["lr"] for r in records if r["lr"] is not None]})
    report, problem = runs.read_json(run, "report.json")
    rows = report.get("rows") if report else None
    table = pd.DataFrame([r for r in rows if isinstance(r, dict)]) if isinstance(rows, list) else pd.DataFrame()
    config, _ = runs.read_config(run)
    lines = [f"**{name}**: {s.state}" + (f" at {s.iteration} / {s.total}" if s.total else "")]
    lines += [f"error: `{s.error}`"] if s.error else []
    lines += [f"malformed: {p}" for p in filter(None, [*s.problems, problem])]
    lines += ["the last metrics line is still being written"] if metrics.partial else []
    if report is None:
        lines += ["no report yet (written when the main job finishes)"]
    return ("  \n".join(lines), _curves(records, "loss", smoothing), lr,
            _curves(records, "grad_norm", smoothing), table, config or {})


def grid_view(root: Path, name: str, index: float | None, follow: bool) -> tuple:
    """(slider, image, caption, count) for the sample grid at ``index``, or the newest one when
    ``follow``."""
    try:
        found = runs.grids(runs.run_dir(root, name)) if name else []
    except runs.OutsideRoot as e:
        return gr.Slider(minimum=0, maximum=1, value=0), None, str(e), 0
    if not found:
        caption = "No sample grids yet (written every `sample_every` iterations)."
        return gr.Slider(minimum=0, maximum=1, value=0), None, caption, 0
    last = len(found) - 1
    index = last if follow else min(max(int(index or 0), 0), last)
    iteration, path = found[index]
    image = open_image(path)
    caption = f"iteration {iteration} (grid {index + 1} of {len(found)}). Rows: " + "; ".join(ROW_LABELS) + "."
    if image is None:
        caption = f"iteration {iteration}: the grid file is malformed or still being written"
    return gr.Slider(minimum=0, maximum=max(last, 1), value=index, step=1), image, caption, len(found)


def report_grid(root: Path, name: str) -> Image.Image | None:
    """The main job's final ``grid.png`` of a run, if it has one."""
    try:
        path = runs.run_file(runs.run_dir(root, name), "grid.png")
    except runs.OutsideRoot:
        return None
    return open_image(path)


#: the largest image the panel decodes (a sample grid is well under a megapixel)
MAX_PIXELS = 16_000_000


def open_image(path: Path) -> Image.Image | None:
    """The PNG at ``path`` as RGB, or ``None`` when it is missing, half-written, not an image, or declares a
    size beyond ``MAX_PIXELS`` (read from its header before anything is decoded)."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                return None
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def default_run(root: Path) -> str | None:
    """The run that last wrote something."""
    names = runs.list_runs(root)
    return min(names, key=lambda n: runs.age(root / n)) if names else None


def form_update(method: str, steps, teacher: str, method_changed: bool) -> tuple:
    """The start form after the method, step count or teacher changed (``jobs.start_form``): a method picked
    by name keeps the settings and budget typed for it while the step count or teacher changes; auto's
    choice follows them."""
    if method != "auto" and not method_changed:
        return gr.update(), gr.update(), gr.update(), gr.update()
    return tuple(gr.update() if v is None else v for v in start_form(method, steps, teacher))


def offline_theme() -> gr.themes.Base:
    """Gradio's default look with system fonts (the default theme fetches web fonts)."""
    return gr.themes.Default(
        font=["Liberation Sans", "Arial", "sans-serif"], font_mono=["Liberation Mono", "monospace"]
    )


def build(root: str | Path) -> gr.Blocks:
    """The panel over the runs in ``root`` (created if missing)."""
    root = Path(root).resolve()
    jobs = Jobs(root)
    names = list(methods())
    summaries = "; ".join(f"{n}: {cls.summary}" for n, cls in methods().items())

    def start(name, teacher, method, steps, iters, batch, options=""):
        try:
            jobs.start(name, teacher, method, steps, iters, batch, options)
        except ValueError as e:
            return str(e)
        return f"started {name!r}; it appears in the runs table"

    def table() -> pd.DataFrame:
        return pd.DataFrame(runs_rows(root, jobs), columns=TABLE_COLUMNS)

    def refresh(name, smoothing, index, seen):
        """Everything, for the timer: the slider keeps following the newest grid if it was on it."""
        names = runs.list_runs(root)
        name = name or default_run(root)
        follow = seen is None or int(index or 0) >= seen - 1
        return (table(), gr.Dropdown(choices=names, value=name), *run_view(root, jobs, name, smoothing),
                *grid_view(root, name, index, follow), report_grid(root, name) if name else None)

    def runs_api() -> list[dict]:
        """The runs table as records (one dict per run, keys as the table's columns)."""
        return [dict(zip(TABLE_COLUMNS, row)) for row in runs_rows(root, jobs)]

    with gr.Blocks(title="Distill panel") as app:
        gr.Markdown(f"# Distill panel\nRuns under `{root}`, refreshed every {REFRESH_S:g} s.")
        runs_df = gr.Dataframe(value=table(), headers=TABLE_COLUMNS, interactive=False, label="runs",
                               elem_id="runs-table")
        with gr.Row():
            run = gr.Dropdown(choices=runs.list_runs(root), value=default_run(root), label="run",
                              allow_custom_value=True, scale=2)
            smoothing = gr.Slider(0, 0.99, value=0.6, step=0.01, label="curve smoothing", scale=1)
        note = gr.Markdown(elem_id="run-note")
        with gr.Row():
            # titles inside the chart: a block label would push the legend out of the block
            plot = {"x": "iter", "show_label": False, "height": PLOT_HEIGHT}
            loss = gr.LinePlot(y="loss", color="student step", title="loss per student step", label="loss",
                               elem_id="loss-plot", **plot)
            grad = gr.LinePlot(y="grad_norm", color="student step", title="gradient norm", label="gradient norm",
                               elem_id="grad-plot", **plot)
            lr = gr.LinePlot(y="lr", title="learning rate", label="learning rate", elem_id="lr-plot", **plot)
        grid_slider = gr.Slider(0, 1, value=0, step=1, label="sample grid (over training time)")
        grid_image = gr.Image(type="pil", format="png", label="samples", elem_id="sample-grid",
                              interactive=False)
        grid_caption = gr.Markdown()
        grid_count = gr.State(None)
        with gr.Accordion("report and config", open=False):
            report = gr.Dataframe(label="metrics against the teacher's reference solve", interactive=False)
            final_grid = gr.Image(type="pil", format="png", label="final grid (grid.png)", interactive=False)
            config = gr.JSON(label="config")
        with gr.Accordion("start a distillation", open=False):
            first = start_form("auto", 4, TEACHERS[0])  # the form opens on auto's choice for 4 steps
            with gr.Row():
                new_name = gr.Textbox(label="run name", value="panel-run")
                teacher = gr.Dropdown(teacher_choices(root), value=TEACHERS[0], label="teacher",
                                      info="builtin-bold: the built-in teacher fine-tuned to bold digits; "
                                      f"{TEACHER_FOLDER}/NAME: a teacher file, from python -m distill_core "
                                      f"train-teacher --out {root / TEACHER_FOLDER}/NAME.safetensors")
                method = gr.Dropdown(["auto", *names], value="auto", label="method", info=AUTO_INFO + summaries)
                steps = gr.Number(4, precision=0, minimum=1, maximum=16, label="steps (SFD-v: top of 2..steps)")
                iters = gr.Number(first[1], precision=0, minimum=1, label="iterations")
                batch = gr.Number(first[2], precision=0, minimum=1, label="batch")
            choice = gr.Markdown(first[3], elem_id="method-choice")
            options = gr.Code(first[0], language="yaml", label="the method's settings (YAML)",
                              elem_id="method-options")
            with gr.Row():
                start_button = gr.Button("start", variant="primary")
                stop_button = gr.Button("stop the selected run (checkpoint, resumable)", variant="stop")
            message = gr.Markdown()

        views = [note, loss, lr, grad, report, config]
        grids = [grid_slider, grid_image, grid_caption, grid_count]
        everything = [runs_df, run, *views, *grids, final_grid]
        inputs = [run, smoothing, grid_slider, grid_count]
        gr.Timer(REFRESH_S).tick(refresh, inputs, everything, api_visibility="private")
        app.load(refresh, inputs, everything, api_visibility="private")
        run.change(lambda n, s: run_view(root, jobs, n, s), [run, smoothing], views, api_name="run")
        run.change(lambda n: (*grid_view(root, n, None, True), report_grid(root, n)), run, [*grids, final_grid],
                   api_visibility="private")
        smoothing.release(lambda n, s: run_view(root, jobs, n, s), [run, smoothing], views,
                          api_visibility="private")
        grid_slider.release(lambda n, i: grid_view(root, n, i, False), [run, grid_slider], grids, api_name="grid")
        form = [options, iters, batch, choice]
        method.change(lambda m, n, t: form_update(m, n, t, True), [method, steps, teacher], form,
                      api_visibility="private")
        for field in (steps, teacher):  # auto's choice follows the step count and the teacher
            field.change(lambda m, n, t: form_update(m, n, t, False), [method, steps, teacher], form,
                         api_visibility="private")
        teacher.focus(lambda: gr.Dropdown(choices=teacher_choices(root)), None, teacher, api_visibility="private")
        start_button.click(start, [new_name, teacher, method, steps, iters, batch, options], message,
                           api_name="start")
        stop_button.click(jobs.stop, run, message, api_name="stop")
        gr.api(runs_api, api_name="runs")
    return app
