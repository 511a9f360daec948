"""The dashboard as a pure function of a `RunSnapshot`: ``render(snapshot, width, height)``.

`render` reads the snapshot and the terminal size only, so it can be golden-tested and Rich's
output never reads the engine's mutable state (``live.py`` drives it, ``watch.py`` too).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rich import box
from rich.cells import cell_len
from rich.color import Color
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from orchestrator.ui.cells import NONE, elide, fmt_duration
from orchestrator.ui.cells import fit as _fit
from orchestrator.ui.charts import charts
from orchestrator.ui.event_log import events_panel, log_entries, log_size
from orchestrator.ui.snapshot import DeviceView, GapslView, RunSnapshot

_SHADES = "·░▒▓█"
EVENT_SHARE = 0.28  # of the lines below the header, the most the event log takes from trends
STATUS_STYLES = {
    "waiting": "dim", "joined": "cyan", "computing": "green", "sending": "blue",
    "straggling": "bold yellow", "lost": "bold red", "done": "bold green",
}  # fmt: skip
PHASE_STYLES = {
    "waiting": "bold yellow", "training": "bold green", "evaluating": "bold cyan",
    "completed": "bold green", "failed": "bold red", "interrupted": "bold yellow",
}  # fmt: skip


def _num(v: float | None, digits: int = 1) -> str:
    return NONE if v is None else f"{v:.{digits}f}"


def _auto(v: float | None) -> str:
    """Three significant-ish digits, so 0.84 and 312 both stay short."""
    if v is None:
        return NONE
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _header(snap: RunSnapshot, cw: int) -> list[Text]:
    part = snap.partition if snap.alpha is None else f"{snap.partition} α={snap.alpha:g}"
    ident = Text(" · ").join(Text(p) for p in (snap.algorithm, snap.dataset, part))
    served = "" if snap.listen in ("", "in-process") else f"serving ws://{snap.listen}"
    if served and ident.cell_len + len(served) + 3 <= cw:  # once bound, with the real port
        ident.append(f" · {served}", style="dim")

    total = max(snap.rounds, 1)
    frac = min(max(snap.round / total, 0.0), 1.0)
    prefix = Text(f"{snap.phase.upper()}", style=PHASE_STYLES.get(snap.phase, "bold"))
    prefix.append(f"  round {snap.round}/{snap.rounds} ")
    suffix = f" {frac * 100:3.0f}%  elapsed {fmt_duration(snap.elapsed_s)}"
    suffix += f"  ETA {fmt_duration(snap.eta_s)}"
    bar_w = cw - prefix.cell_len - len(suffix)
    progress = prefix.copy()
    if bar_w >= 6:
        filled = int(round(frac * bar_w))
        progress.append("█" * filled, style="green")
        progress.append("░" * (bar_w - filled), style="dim")
    progress.append(suffix)

    ev = snap.last_eval
    acc = Text("accuracy ", style="bold")
    if ev is None:
        acc.append(f"{NONE} (no evaluation yet)", style="dim")
    else:
        acc.append(f"mean {ev.acc_mean:.3f}  min {ev.acc_min:.3f}  max {ev.acc_max:.3f}")
        acc.append(f"  (round {ev.round}, loss {ev.loss:.3f})", style="dim")
    lines = [ident, progress, acc]
    if snap.message:
        lines.append(Text(snap.message, style="red" if snap.phase == "failed" else "yellow"))
    return [_fit(t, cw) for t in lines]


_HOST_MAX_W = 24  # the host column: enough to tell machines apart, never the table's bulk
_HOST_NAME_W = 12  # of which the host name keeps this much before the facts give way


def _host(d: DeviceView) -> str:
    """``raspberrypi-01 aarch64 4c/4G`` in at most 24 characters: the machine (not the OS: a lab
    runs Linux), an accelerator, cores and memory, dropped from the front until the name reads."""
    facts = [
        d.platform.split()[-1] if d.platform else "",
        d.torch_device if d.torch_device not in ("", "cpu") else "",
        f"{d.cpu_count}c/{d.memory_gib:.0f}G" if d.cpu_count else "",
        d.node,  # a Ray-placed agent's node: the fact kept longest
    ]
    facts = [f for f in facts if f]
    name = d.hostname or d.launch
    want = min(len(name), _HOST_NAME_W)
    while facts and _HOST_MAX_W - len(" ".join(facts)) - 1 < want:
        facts.pop(0)
    tail = " ".join(facts)
    room = _HOST_MAX_W - len(tail) - 1 if tail else _HOST_MAX_W
    return f"{elide(name, room)} {tail}".strip()


def _updown(d: DeviceView) -> str:
    both = d.uplink_mbps is None and d.downlink_mbps is None
    return NONE if both else f"{_auto(d.uplink_mbps)}/{_auto(d.downlink_mbps)}"


# (key, header, right-justified, cell) in display order; `_FLEET_PRIORITY` decides what is kept.
_FLEET_COLUMNS: list[tuple[str, str, bool, Callable[[DeviceView], str]]] = [
    ("device", "device", False, lambda d: d.id + (" ⚠" if d.warning else "")),
    ("status", "status", False, lambda d: d.status),
    ("host", "host", False, _host),
    ("cpu", "cpu%", True, lambda d: _num(d.cpu_percent, 0)),
    ("mem", "mem%", True, lambda d: _num(d.mem_percent, 0)),
    ("temp", "°C", True, lambda d: _num(d.temp_c, 0)),
    ("compute", "ms/smp", True, lambda d: _auto(d.compute_ms_per_sample)),
    ("rtt", "rtt ms", True, lambda d: _auto(d.rtt_ms)),
    ("link", "up/dn Mbps", True, _updown),
    ("batch", "batch", True, lambda d: str(d.batch_size or NONE)),
    ("shard", "shard", True, lambda d: str(d.shard_size or NONE)),
    ("rounds", "rounds", True, lambda d: str(d.rounds_done)),
    ("loss", "loss", True, lambda d: _num(d.last_loss, 3)),
    ("acc", "acc", True, lambda d: _num(d.accuracy, 3)),
]
_FLEET_PRIORITY = (
    "device", "status", "rounds", "loss", "acc", "compute", "rtt", "link", "batch",
    "cpu", "mem", "temp", "shard", "host",
)  # fmt: skip
_HOST_MIN_W = 12
_ID_MAX_W = 16


def _fleet(snap: RunSnapshot, width: int, height: int) -> Panel:
    cw = width - 4
    rows_fit = max(height - 3, 1)
    shown = list(snap.devices)
    hidden = 0
    if len(shown) > rows_fit:
        hidden = len(shown) - (rows_fit - 1)
        shown = shown[: rows_fit - 1]
    cells = {k: [fn(d) for d in shown] for k, _, _, fn in _FLEET_COLUMNS}
    if hidden:
        cells["device"].append(f"+{hidden} more")
    heads = {k: h for k, h, _, _ in _FLEET_COLUMNS}
    widths = {k: max([cell_len(heads[k])] + [cell_len(c) for c in cells[k]]) for k in cells}
    widths["host"] = max(min(widths["host"], _HOST_MAX_W), _HOST_MIN_W)
    widths["device"] = min(widths["device"], _ID_MAX_W)
    keep: set[str] = set()
    used = -2  # n columns take n-1 gaps of two cells
    for key in _FLEET_PRIORITY:
        need = _HOST_MIN_W if key == "host" else widths[key]
        if used + 2 + need <= cw or len(keep) < 2:
            keep.add(key)
            used += 2 + need
    # The host column alone gives way (down to 12 cells) to the columns kept before it.
    widths["host"] = min(widths["host"], _HOST_MIN_W + max(cw - used, 0))
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    cols = [(k, right) for k, _, right, _ in _FLEET_COLUMNS if k in keep]
    for key, right in cols:
        table.add_column(
            heads[key],
            justify="right" if right else "left",
            no_wrap=True,
            overflow="ellipsis",
            min_width=widths[key],
            max_width=widths[key],
        )
    for i in range(len(cells["device"])):
        row: list[Text] = []
        for key, _ in cols:
            value = cells[key][i] if i < len(cells[key]) else ""
            style = STATUS_STYLES.get(value, "") if key == "status" else ""
            row.append(Text(value, style="dim italic" if i >= len(shown) else style))
        table.add_row(*row)
    joined = sum(d.status not in ("waiting", "lost") for d in snap.devices)
    title = Text(f"fleet {joined}/{len(snap.devices)} connected")
    return Panel(table, title=title, title_align="left", height=height, box=box.ROUNDED)


def _cos_style(v: float) -> Style:
    # sqrt stretches the small cosines PSL gradients actually have (DESIGN.md: mean 0.01-0.14).
    m = math.sqrt(min(abs(v), 1.0))
    rgb = (int(40 + 150 * m), 40, 40) if v < 0 else (40, int(40 + 140 * m), int(40 + 40 * m))
    return Style(color="white", bgcolor=Color.from_rgb(*rgb))


def _gapsl_label_w(g: GapslView) -> int:
    # "★ 12 device-id " — leader mark, column number, id (capped), one space before the cells.
    digits = len(str(len(g.device_ids)))
    return 2 + digits + 1 + min(max((cell_len(i) for i in g.device_ids), default=1), 10) + 1


def _gapsl_width(g: GapslView, compact: bool) -> int:
    return max(_gapsl_label_w(g) + len(g.device_ids) * (2 if compact else 6), 26) + 4


def _gapsl_height(g: GapslView, compact: bool) -> int:
    """Borders, column numbers (numeric cells only) and one row per device."""
    return 2 + (0 if compact else 1) + len(g.device_ids)


def _gapsl(g: GapslView, width: int, height: int, compact: bool) -> Panel:
    cw, lines = width - 4, max(height - 2, 1)
    lw, leaders = _gapsl_label_w(g), set(g.leaders)
    digits = len(str(len(g.device_ids)))
    body: list[Text] = []
    if not compact and lines >= 2:
        head = Text(" " * lw)
        for j in range(len(g.device_ids)):
            head.append(f"{'#' + str(j + 1):>6}", style="dim")
        body.append(head)
    for i, dev in enumerate(g.device_ids[: lines - len(body)]):
        mark = "★ " if dev in leaders else "  "
        label = f"{mark}{i + 1:>{digits}} {dev[: lw - digits - 4]}"
        row = Text(f"{label:<{lw}}", style="bold" if dev in leaders else "")
        for j, v in enumerate(g.cosine[i] if i < len(g.cosine) else ()):
            if compact:
                lvl = min(int(math.sqrt(min(abs(v), 1.0)) * 5), 4)
                row.append(_SHADES[lvl] * 2, style="green" if v >= 0 else "red")
            else:
                row.append(" " + ("    ·" if i == j else f"{v:+.2f}"), style=_cos_style(v))
        body.append(row)
    if len(body) < lines:
        body.append(Text(f"leaders {len(g.leaders)}/{len(g.device_ids)}: " + ", ".join(g.leaders)))
    if g.churn is not None and len(body) < lines:
        # How stable the leader set is: 0 % = the same devices lead round after round.
        body.append(Text(f"churn {100 * g.churn:.0f} % of leaders per round", style="dim"))
    subtitle = None
    if g.align_before is not None or g.align_after is not None:
        # Mean cos(g_i, g_L) before and after GDA: how much the alignment pulled (DESIGN.md).
        subtitle = Text(f"align {_num(g.align_before, 2)}→{_num(g.align_after, 2)}")
    title, group = _fit(Text("GAPSL cosine · ★ leader"), cw), Group(*(_fit(t, cw) for t in body))
    return Panel(group, title=title, title_align="left", subtitle=subtitle, height=height)


def agent_command(listen: str, device_id: str) -> str:
    """How to start a device's agent; the token is never shown, only its placeholder."""
    return f"gapsl-agent --orchestrator ws://{listen} --id {device_id} --token <token>"


def _waiting(snap: RunSnapshot, width: int, height: int) -> Panel:
    cw = width - 4
    missing = [d for d in snap.devices if d.status == "waiting"]
    names = ", ".join(d.id + (f" ({d.launch})" if d.launch != "remote" else "") for d in missing)
    body = [_fit(Text(f"missing {len(missing)} of {len(snap.devices)}: {names}"), cw)]
    remote = [d for d in missing if d.launch == "remote"]
    if remote:
        body.append(Text("start each missing device with:", style="dim"))
        # Commands fold rather than truncate: they are meant to be copied whole.
        body += [Text(agent_command(snap.listen, d.id), style="bold") for d in remote]
        if snap.listen.rsplit(":", 1)[0] in ("0.0.0.0", "::", "[::]", ""):
            body.append(Text("(use this machine's address in place of the wildcard host)"))
    elif missing:
        body.append(Text("the orchestrator is starting their agents", style="dim"))
    title = "waiting for devices"
    if snap.join_deadline_s is not None:
        # testbed.join_timeout_s counting down: when the run gives up on the missing ones.
        left = max(snap.join_deadline_s - snap.elapsed_s, 0.0)
        title += f" · {fmt_duration(left)} left of the join timeout"
    return Panel(Group(*body), title=_fit(Text(title), cw), title_align="left", height=height)


def _waiting_height(snap: RunSnapshot, cw: int) -> int:
    remote = [d for d in snap.devices if d.status == "waiting" and d.launch == "remote"]
    cmds = sum(math.ceil(cell_len(agent_command(snap.listen, d.id)) / cw) for d in remote)
    return 2 + 1 + (2 + cmds if remote else 1)


def render(snap: RunSnapshot, width: int = 120, height: int = 40) -> RenderableType:
    """The whole dashboard for `snap`, at most `width` cells wide and `height - 1` lines tall
    (one line is left for the cursor); detail is dropped, lowest priority first, to fit."""
    width, budget = max(width, 40), max(height - 1, 8)
    head_lines = _header(snap, width - 4)
    header = Panel(
        Group(*head_lines),
        title=_fit(Text(snap.name, style="bold"), width - 8),
        title_align="left",
        subtitle=_fit(Text(snap.run_dir, style="dim"), width - 8) if snap.run_dir else None,
        subtitle_align="right",
    )
    left = budget - len(head_lines) - 2

    waiting = snap.phase == "waiting" and bool(snap.missing)
    g = None if waiting else snap.gapsl
    # Side by side when the charts keep at least 40 cells; numeric cosines before shaded ones.
    compact = g is not None and width - _gapsl_width(g, False) < 40
    side = g is not None and width - _gapsl_width(g, compact) >= 40
    if waiting:
        mid_base = mid_full = _waiting_height(snap, width - 4)
    else:
        g_base = 0 if g is None else _gapsl_height(g, compact)
        # Stacked below the charts, the heat map only takes space nothing else needs.
        mid_base = max(5, g_base) if side else 5
        # A tall terminal gives the trends half of what is left: a long run's history reads.
        mid_full = max(15, left // 2, g_base + 1) if side else max(15, left // 2) + g_base + 1
    # The log's fixed share of the height: however long the run, it never grows into the
    # trends (at 80x24 they keep at least 3 rows); only what the trends cannot use is its too.
    ev_want = min(2 + max(log_size(snap), 1), max(3, int(left * EVENT_SHARE)))
    # A large fleet gets at most 3/5 of the space so charts and events stay on screen.
    fleet_h = min(
        3 + max(len(snap.devices), 1), max(4, min(left - mid_base - ev_want, left * 3 // 5))
    )
    mid_h = max(min(mid_full, left - fleet_h - ev_want), 0)
    ev_h = min(2 + max(log_size(snap), 1), left - fleet_h - mid_h)

    parts: list[RenderableType] = [header, _fleet(snap, width, fleet_h)]
    if waiting and mid_h >= 3:
        parts.append(_waiting(snap, width, mid_h))
    elif mid_h >= 3:
        if g is not None and side:
            gw = _gapsl_width(g, compact)
            grid = Table.grid(expand=True)
            grid.add_column(ratio=1)
            grid.add_column(width=gw)
            grid.add_row(charts(snap, width - gw, mid_h), _gapsl(g, gw, mid_h, compact))
            parts.append(grid)
        elif g is not None and mid_h >= 8:
            g_h = min(_gapsl_height(g, compact) + 1, mid_h - 5)
            parts += [charts(snap, width, mid_h - g_h), _gapsl(g, width, g_h, compact)]
        else:
            parts.append(charts(snap, width, mid_h))
    if ev_h >= 3:
        parts.append(events_panel(log_entries(snap, ev_h - 2), width, ev_h))
    return Group(*parts)
