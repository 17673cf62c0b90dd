"""The page's two teaching tabs: the learning timeline (what each version says) and "How it works" (the phases
of RLHF with this app's live numbers). A UI module: builds Gradio components; the content comes from
`timeline` and `dashboard`, which are plain Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from rlhf_online import dashboard, timeline
from rlhf_online.judge import current_feedback_mode

HOW_REFRESH_S = 5.0
TIMELINE_INTRO = (
    "The trainer asks every version it publishes the same questions, and the base model too. Each card shows the "
    "newest versions first and the **base model** last; words the base did not use are highlighted. Answers are "
    "greedy (no sampling luck), so a difference comes from what the version learned. *Reward* is the reward "
    "model's score when the version was published. Watch for answers that score higher but read worse: that is "
    "reward hacking.")


def curve_plot(**kwargs) -> gr.LinePlot:
    """A line plot whose curves show from their first point.

    Why: Gradio draws a line mark and shows its points only on hover, so a curve of one point (the panel right
    after the first PPO iteration, or the reward model's first pairs) was an empty box. While no series has a
    second point, the same data goes out with Gradio's point mark (its ScatterPlot's), then as a line again.
    Not a subclass: Gradio's component metaclass writes a .pyi stub beside the module of every Component subclass.
    """
    plot = gr.LinePlot(**kwargs)
    as_line = plot.postprocess

    def postprocess(value):
        data = as_line(value)
        if isinstance(value, pd.DataFrame) and data is not None and not value.empty:
            series = value.groupby(plot.color).size() if plot.color in value else pd.Series([len(value)])
            if series.max() < 2:
                data.mark = "point"
        return data

    plot.postprocess = postprocess
    if isinstance(kwargs.get("value"), pd.DataFrame):  # the constructor already sent it through the class's own
        plot.value = postprocess(kwargs["value"]).model_dump()
    return plot


@dataclass
class LearningTabs:
    timeline_html: gr.HTML
    timeline_refresh: gr.Button
    how: dict[str, gr.Markdown]
    accuracy_plot: gr.LinePlot
    reward_plot: gr.LinePlot
    kl_plot: gr.LinePlot
    timer: gr.Timer

    @property
    def how_outputs(self) -> list:
        return [*self.how.values(), self.accuracy_plot, self.reward_plot, self.kl_plot]


def build_timeline_tab() -> tuple[gr.HTML, gr.Button]:
    gr.Markdown(TIMELINE_INTRO)
    refresh = gr.Button("Refresh", size="sm", elem_id="timeline-refresh")
    return gr.HTML(elem_id="timeline"), refresh


def build_how_tab() -> tuple[dict[str, gr.Markdown], gr.LinePlot, gr.LinePlot, gr.LinePlot]:
    gr.Markdown("Reinforcement learning from human feedback, on this page, in three phases. Numbers are live.")
    how = {"sft": gr.Markdown()}
    with gr.Row():
        with gr.Column():
            how["reward"] = gr.Markdown()
            accuracy = curve_plot(x="pairs", y="accuracy", color="series", y_lim=[0, 1], height=220,
                                  title="Reward model: share of new pairs guessed right")
        with gr.Column():
            how["ppo"] = gr.Markdown()
            reward = curve_plot(x="iteration", y="mean_score", height=180, title="PPO: mean reward")
            kl = curve_plot(x="iteration", y="kl", height=180, title="PPO: KL to the original model")
    with gr.Row():
        how["hacking"] = gr.Markdown()
        how["ai"] = gr.Markdown()
    return how, accuracy, reward, kl


def refresh_timeline(services) -> str:
    return timeline.timeline_html(timeline.load_entries(services.store))


def refresh_how(services) -> tuple:
    store, cfg = services.store, services.cfg
    reward_metrics, ppo_metrics = store.latest_metrics("reward", 500), store.latest_metrics("ppo", 500)
    win_rates = store.version_win_rates()
    try:
        mode = current_feedback_mode(store, cfg.feedback.feedback_mode)
    except ValueError:
        mode = "human"
    sections = dashboard.phases_markdown(store.counts(), reward_metrics, ppo_metrics, win_rates,
                                         store.feedback_counts(), mode, cfg.ppo,
                                         dashboard.reward_hacking_warning(ppo_metrics, win_rates))
    ppo = pd.DataFrame(dashboard.ppo_curves(ppo_metrics), columns=dashboard.PPO_COLUMNS)
    accuracy = pd.DataFrame(dashboard.reward_curve(reward_metrics), columns=dashboard.REWARD_COLUMNS)
    return (*[sections[key] for key in ("sft", "reward", "ppo", "hacking", "ai")], accuracy, ppo, ppo)


def wire(services, tabs: LearningTabs, tabs_block: gr.Tabs, timeline_tab: gr.Tab, how_tab: gr.Tab) -> None:
    """Refresh each tab when it is opened; "How it works" keeps refreshing while it stays open."""
    private = {"api_visibility": "private"}
    show_timeline = functools.partial(refresh_timeline, services)
    show_how = functools.partial(refresh_how, services)
    timeline_tab.select(show_timeline, None, tabs.timeline_html, show_progress="hidden", **private)
    tabs.timeline_refresh.click(show_timeline, None, tabs.timeline_html, show_progress="hidden", **private)
    how_tab.select(show_how, None, tabs.how_outputs, show_progress="hidden", **private)
    tabs.timer.tick(show_how, None, tabs.how_outputs, show_progress="hidden", concurrency_id="dashboard", **private)

    def timer_for(event: gr.SelectData):
        return gr.Timer(active=event.value == how_tab.label)
    tabs_block.select(timer_for, None, tabs.timer, **private)
