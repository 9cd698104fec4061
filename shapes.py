"""
The Shapes world: a synthetic video-next-event world with known ground truth, and what it
takes to train VANS on it from random weights on a CPU. Nothing here is on the paper's path:
the paper's files never import it; the scripts reach it by name (--model random:shapes, the preset
PRESET; --metrics shapes:metrics; --rewards shapes:...; a config file that names them).

    python shapes.py data --out data/shapes                     # the world: clips, questions, answers
    python shapes.py train-clip --train data/shapes/train.jsonl --out data/shapes/clip   # its CLIP
    python shapes.py train-vae --out out/shapes/vae             # its VAE, before sft_vdm.py

    the world      scenes, their clips and texts, and the generator's record of each event
    the event      does a caption state it, does a video show it (metrics: eval.py's and the
                   training scripts' --metrics), and the same as rewards (--rewards
                   shapes:caption_reward=1 / shapes:video_reward=1)
    the models     the preset (PRESET) and its tokenizer (BPE fitted to the world's text), the VAE's
                   per-frame start and training, and a tiny CLIP for CLIP-V / CLIP-T, which OpenAI's
                   CLIP cannot give here
"""

import json
import math
import os
import re

import numpy as np

import data

# -----------------------------------------------------------------------------
# the world
#
# Every scene holds two or more objects of different colours that could each do the event; the
# question says which one does. The VDM never sees the question, only the caption and the
# reference frames, so a caption that does not name the object leaves it guessing.
#   procedural  a tower is built from the blocks waiting on the table; the input clip shows
#               the last block placed. "I want the blue block on the tower next. What should
#               I do?" -> that block goes on top.
#   predictive  two or three balls rest one above the other, each on its own ground line, with
#               or without a wall at each side. "What happens if the red ball is pushed to the
#               left?" -> it rolls left and bounces back off the wall, or leaves the frame.
#   two futures every 4th scene asks a second question, about another object, of the same input.
# Annotations are written as people write them: with probability --vague a training caption
# states the event without naming the object ("The ball rolls to the left and out of the
# frame."), otherwise it names it. Every line keeps the named caption and the event too.
# The "classic" world (`--world classic`: one ball; blocks taken left to right, so the input
# decides and every caption names its object) is the control; the shipped models are of the question world.
# Everything is scaled to the frame height, so any size renders the same scene.

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (150, 60, 190), "orange": (240, 130, 20)}
# No floor is drawn (objects stand on the line y = H * 14/16): a floor next to every object
# would share the VLM's vision tokens with it and hide it from a VLM trained from scratch.
BACKGROUND, WALL = (235, 235, 235), (60, 60, 60)
N_IN, N_OUT = 40, 33  # input and target clip lengths


def _canvas(n, H, W):
    f = np.empty((n, H, W, 3), np.uint8)
    f[:] = BACKGROUND
    return f


def _box(f, cx, cy, half, color):
    """Fill the square centred at (cx, cy) with half-size `half` (clipped to the frame)."""
    H, W = f.shape[:2]
    y0, y1, x0, x1 = (max(0, round(v)) for v in (cy - half, cy + half, cx - half, cx + half))
    f[min(y0, H):min(y1, H), min(x0, W):min(x1, W)] = color


def _disc(f, cx, cy, r, color):
    H, W = f.shape[:2]
    yy, xx = np.ogrid[:H, :W]
    f[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = color


def _path(a, b, n, lift):
    """n positions from a to b: up by `lift`, across, down (a block carried by hand)."""
    (ax, ay), (bx, by) = a, b
    top = min(ay, by) - lift
    legs = [abs(ay - top), abs(bx - ax), abs(by - top)]
    total = sum(legs) or 1.0
    out = []
    for t in np.linspace(0, total, n):
        if t <= legs[0]:
            out.append((ax, ay - t))
        elif t <= legs[0] + legs[1]:
            out.append((ax + np.sign(bx - ax) * (t - legs[0]), top))
        else:
            out.append((bx, top + (t - legs[0] - legs[1])))
    return out


def _tower(H, W, names):
    """The tower scenes' geometry and painter: blocks of half-size `half` on the tower (position i from
    the bottom) or waiting on the table (slot j, block names[j]). -> (half, on_tower(i), on_table(j),
    frames(moving block, its path, placed names, waiting slots, count) -> uint8 (count, H, W, 3))"""
    u = H / 16
    half, floor_y = u, H * 14 / 16
    tower_x = W * 0.22
    slot_x = [W * 0.45 + j * (2 * half + u) for j in range(len(names))]  # block j waits at slot j
    on_tower = lambda i: (tower_x, floor_y - half - 2 * half * i)
    on_table = lambda j: (slot_x[j], floor_y - half)

    def frames(moving, path, placed, waiting, count):
        f = _canvas(count, H, W)
        for t in range(count):
            for i, c in enumerate(placed):
                _box(f[t], *on_tower(i), half, COLORS[c])
            for j in waiting:
                _box(f[t], *on_table(j), half, COLORS[names[j]])
            _box(f[t], *path[t], half, COLORS[moving])
        return f
    return half, on_tower, on_table, frames


def pick_scene(rng, H, W, questions):
    """A tower built from 4 or 5 blocks; the input clip shows the k-th placed (k = 1..n-2, so 2 or
    more wait); each question names a waiting block, which goes on top (questions None: every one).
    -> (input frames, [(question, think, caption, target frames, event), ...])"""
    names = [str(c) for c in rng.permutation(list(COLORS))[:rng.integers(4, 6)]]
    n = len(names)
    k = int(rng.integers(1, n - 1))
    half, on_tower, on_table, frames = _tower(H, W, names)
    hold = 8  # still frames at the start and the end of a move
    p = _path(on_table(k - 1), on_tower(k - 1), N_IN - 2 * hold, 3 * half)
    x = frames(names[k - 1], [p[0]] * hold + p + [p[-1]] * hold, names[:k - 1], range(k, n), N_IN)
    think = (f"A tower is being built from the blocks on the table. It holds {k} block{'s' * (k > 1)} "
             f"({', '.join(names[:k])}, bottom to top); the {names[k - 1]} block was just put on top. "
             f"Waiting on the table: {', '.join(names[k:])}.")
    out = []
    for j in sorted(rng.choice(range(k, n), size=questions or n - k, replace=False).tolist()):
        p = _path(on_table(j), on_tower(k), N_OUT - hold, 3 * half)
        y = frames(names[j], p + [p[-1]] * hold, names[:k], [w for w in range(k, n) if w != j], N_OUT)
        out.append((f"I want the {names[j]} block on the tower next. What should I do?",
                    think + f" The {names[j]} block is wanted next, so it goes on top of the {names[k - 1]} one.",
                    f"Pick up the {names[j]} block and put it on top of the {names[k - 1]} block.", y,
                    {"world": "stack", "action": "place", "color": names[j], "onto": names[k - 1], "height": k,
                     "others": [names[w] for w in range(k, n) if w != j]}))
    return x, out


def push_scene(rng, H, W, questions):
    """Two or three balls at rest, one above the other (each on its own ground line, so none is in
    another's way), a wall at each side or not; each question pushes one ball to one side: it
    bounces back off the wall there, or leaves the frame. The input clip is still: only the
    question says which ball moves, and where (questions None: every ball to every side). -> as pick_scene"""
    u = H / 16
    r, wall_w = u, u / 2
    names = [str(c) for c in rng.permutation(list(COLORS))[:rng.integers(2, 4)]]
    ground = [H * (14 - 4 * i) / 16 for i in range(len(names))]  # bottom up
    x0 = [float(rng.uniform(0.3, 0.7)) * W for _ in names]
    walls = {side: bool(rng.random() < 0.5) for side in ("left", "right")}
    v = W / float(rng.uniform(30, 36))  # px per frame: a bounce comes back by 0.2 W or more, a leaving ball is gone

    def frames(count, moving=None, side=None):
        d = 1 if side == "right" else -1
        edge = W - wall_w - r if d > 0 else wall_w + r  # where the ball touches the wall
        f = _canvas(count, H, W)
        for t in range(count):
            for s_, there in walls.items():
                if there:
                    f[t, :round(ground[0]), round(W - wall_w) if s_ == "right" else 0:W if s_ == "right" else round(wall_w)] = WALL
            for i, c in enumerate(names):
                x = x0[i]
                if i == moving:
                    x = x0[i] + d * v * t
                    x = edge - (x - edge) if walls[side] and d * (x - edge) > 0 else x
                _disc(f[t], x, ground[i] - r, r, COLORS[c])
        return f

    x = frames(N_IN)
    said = lambda s_: f"there is a wall on the {s_}" if walls[s_] else f"nothing blocks the {s_} side"
    think = (f"{len(names)} balls rest on the ground, one above the other: {', '.join(names)}, bottom to top. "
             f"{said('left').capitalize()}, and {said('right')}.")
    out = []
    pairs = [(i, s_) for i in range(len(names)) for s_ in ("left", "right")]
    for m in sorted(rng.choice(len(pairs), size=questions or len(pairs), replace=False).tolist()):
        i, side = pairs[m]
        outcome = "bounce" if walls[side] else "leave"
        caption = (f"The {names[i]} ball rolls to the {side}, hits the wall and bounces back." if outcome == "bounce"
                   else f"The {names[i]} ball rolls to the {side} and out of the frame.")
        reason = "the wall will push it back." if outcome == "bounce" else "nothing will stop it, so it keeps going past the edge."
        out.append((f"What happens if the {names[i]} ball is pushed to the {side}?",
                    think + f" The {names[i]} ball is pushed to the {side}: {reason}", caption, frames(N_OUT, i, side),
                    {"world": "ball", "outcome": outcome, "color": names[i], "side": side,
                     "others": [c for c in names if c != names[i]]}))
    return x, out


def vague_caption(caption, event):
    """The caption as a vague annotator writes it: the event, without naming the object."""
    if event["world"] == "stack":
        return ("Pick up the next block and put it on top of the tower." if event["action"] == "place" else
                "Take the block off the top of the tower and put it back on the table.")
    return caption.replace(f"The {event['color']} ball", "The ball", 1)


def classic_stack_scene(rng, H, W, hypothetical):
    """The classic world's tower: the leftmost waiting block goes next. -> as pick_scene."""
    names = [str(c) for c in rng.permutation(list(COLORS))[:rng.integers(3, 6)]]
    n = len(names)
    k = int(rng.integers(1, n))  # blocks on the tower after the input clip (1..n-1)
    half, on_tower, on_table, frames = _tower(H, W, names)

    # input: block k-1 is carried from its slot onto the tower (still at the start and the end)
    hold = 8
    p = _path(on_table(k - 1), on_tower(k - 1), N_IN - 2 * hold, 3 * half)
    x = frames(names[k - 1], [p[0]] * hold + p + [p[-1]] * hold, names[:k - 1], range(k, n), N_IN)
    said_tower = ", ".join(names[:k])
    think = (f"A tower is being built from the blocks on the table, taken from left to right. The tower holds "
             f"{k} block{'s' * (k > 1)} ({said_tower}, bottom to top); the {names[k - 1]} block was just put on top. "
             f"Waiting on the table: {', '.join(names[k:])}.")
    out = []
    q = "What should I do next?"
    p = _path(on_table(k), on_tower(k), N_OUT - hold, 3 * half)
    y = frames(names[k], p + [p[-1]] * hold, names[:k], range(k + 1, n), N_OUT)
    out.append((q, think + f" The next block in line is the {names[k]} one.",
                f"Pick up the {names[k]} block and put it on top of the {names[k - 1]} block.", y,
                {"world": "stack", "action": "place", "color": names[k], "onto": names[k - 1], "height": k}))
    if hypothetical:
        q = "What should I do next if I want to take the tower apart?"
        p = _path(on_tower(k - 1), on_table(k - 1), N_OUT - hold, 3 * half)
        y = frames(names[k - 1], p + [p[-1]] * hold, names[:k - 1], range(k, n), N_OUT)
        out.append((q, think + f" To take the tower apart, the top block comes off first: the {names[k - 1]} one.",
                    f"Take the {names[k - 1]} block off the top of the tower and put it back on the table.", y,
                    {"world": "stack", "action": "remove", "color": names[k - 1], "height": k - 1}))
    return x, out


def classic_ball_scene(rng, H, W, hypothetical):
    """The classic world's ball: one ball rolls toward a wall or an open side, or slows down."""
    u = H / 16
    r, floor_y, wall_w = u, H * 14 / 16, u / 2
    color = str(rng.choice(list(COLORS)))
    side = str(rng.choice(["left", "right"]))
    d = 1 if side == "right" else -1
    outcome = str(rng.choice(["bounce", "leave", "stop"]))
    wall = outcome == "bounce" or (outcome == "stop" and rng.random() < 0.5)
    v0 = W / float(rng.uniform(80, 110))  # px per frame
    edge = W - wall_w - r if d > 0 else wall_w + r  # where the ball touches the wall
    if outcome == "stop":
        t_stop = float(rng.uniform(8, 20))  # frames into the target when it stops
        a = v0 / (N_IN + t_stop)
        stop_at = edge - d * float(rng.uniform(1, 3)) * r
        x0 = stop_at - d * v0 * (N_IN + t_stop) / 2
        pos = lambda t: x0 + d * (v0 * min(t, N_IN + t_stop) - a * min(t, N_IN + t_stop) ** 2 / 2)
    else:
        t_hit = float(rng.uniform(6, 16))
        x0 = edge - d * v0 * (N_IN + t_hit)

        def pos(t, wall=wall):  # constant speed; reflected at the wall when there is one
            x = x0 + d * v0 * t
            return edge - (x - edge) if wall and d * (x - edge) > 0 else x

    def frames(t0, count, pos, wall):
        f = _canvas(count, H, W)
        for t in range(count):
            if wall:
                f[t, :round(floor_y), round(W - wall_w) if d > 0 else 0:W if d > 0 else round(wall_w)] = WALL
            _disc(f[t], pos(t0 + t), floor_y - r, r, COLORS[color])
        return f

    x = frames(0, N_IN, pos, wall)
    there = f"There is a wall on the {side}." if wall else f"Nothing blocks the {side} side."
    motion = (f"The {color} ball is slowing down as it rolls to the {side}." if outcome == "stop"
              else f"The {color} ball rolls to the {side} at a steady speed.")
    caption = {"bounce": f"The {color} ball hits the wall on the {side} and bounces back.",
               "leave": f"The {color} ball rolls out of the frame on the {side}.",
               "stop": f"The {color} ball slows down and stops before reaching the {side} side."}
    reason = {"bounce": "It will reach the wall soon, and the wall will push it back.",
              "leave": "Nothing will stop it, so it keeps going past the edge.",
              "stop": "It is losing speed every moment, so it will come to rest."}
    event = lambda o: {"world": "ball", "outcome": o, "color": color, "side": side}
    out = [("What happens next?", f"{motion} {there} {reason[outcome]}", caption[outcome],
            frames(N_IN, N_OUT, pos, wall), event(outcome))]
    if hypothetical and outcome != "stop":
        flip = "leave" if outcome == "bounce" else "bounce"
        q = "What happens next if the wall is removed?" if outcome == "bounce" else \
            f"What happens next if a wall appears on the {side}?"
        alt = lambda t: pos(t, wall=not wall)
        out.append((q, f"{motion} {there} In this case the wall is {'gone' if wall else 'there'}: {reason[flip]}",
                    caption[flip], frames(N_IN, N_OUT, alt, not wall), event(flip)))
    return x, out


WORLDS = ("question", "classic")


def scene(seed, split, i, H, W, world="question", every=False):
    """Scene i of a split, deterministic for (seed, split, i). Every 4th scene asks two questions;
    every=True: the question world's scene with every question it could ask (its every future)."""
    rng = np.random.default_rng([seed, ["train", "val", "test"].index(split), i])
    if world == "classic":
        make = classic_stack_scene if rng.random() < 0.5 else classic_ball_scene
        return make(rng, H, W, hypothetical=(i % 4 == 3))
    make = pick_scene if rng.random() < 0.5 else push_scene
    return make(rng, H, W, questions=None if every else 2 if i % 4 == 3 else 1)


def texts(n_scenes, seed=0):
    """(question, think, caption) of the first n_scenes training scenes, named and vague captions
    both (rendered at 16x28: cheap)."""
    return [(q, think, c) for i in range(n_scenes) for q, think, caption, _, event in scene(seed, "train", i, 16, 28)[1]
            for c in (caption, vague_caption(caption, event))]


# -----------------------------------------------------------------------------
# the event: does a caption state it, does a video show it (eval.py's event accuracy)

def stated_event(text):
    """The event a Shapes caption states, read with the keywords of the generator's templates:
    {"world", "action" | "outcome", "color", "onto" | "side"} with the fields it finds, or None."""
    t = text.lower()
    by_place = lambda words: [w for _, w in sorted((m.start(), w) for w in words for m in re.finditer(rf"\b{w}\b", t))]
    colors, sides = by_place(COLORS), by_place(["left", "right"])
    if re.search(r"\bblock\b", t):
        action = "remove" if re.search(r"\boff the top\b|\bback on the table\b", t) else \
            "place" if re.search(r"\bon top of\b", t) else None
        return {"world": "stack", "action": action, "color": colors[0] if colors else None,
                **({"onto": colors[1] if len(colors) > 1 else None} if action == "place" else {})}
    if re.search(r"\bball\b", t):
        outcome = "bounce" if "bounce" in t else "leave" if re.search(r"\bout of the frame\b", t) else \
            "stop" if re.search(r"\bstops?\b", t) else None
        return {"world": "ball", "outcome": outcome, "color": colors[0] if colors else None,
                "side": sides[0] if sides else None}
    return None


def caption_event(text, event):
    """True iff the caption states the event's outcome: the same action (and, if it names one, the
    same block below) or the same outcome and side. Which object acts is not asked: eval.py's
    event_caption."""
    got = stated_event(text)
    if got is None or got["world"] != event["world"]:
        return False
    if event["world"] == "stack":
        return got["action"] == event["action"] and got.get("onto") in (None, event.get("onto"))
    return got["outcome"] == event["outcome"] and got["side"] == event["side"]


def caption_specific(text, event):
    """True iff the caption states the event and names the object that does it (and the block it
    goes onto): eval.py's specific_caption."""
    got = stated_event(text)
    return caption_event(text, event) and got["color"] == event["color"] and got.get("onto") == event.get("onto")


def _mask(frame, color):
    """(H, W) bool: the pixels whose nearest palette colour is `color` (and near it)."""
    palette = np.array([COLORS[color]] + [c for n, c in COLORS.items() if n != color] + [BACKGROUND, WALL], np.float32)
    d = ((frame[:, :, None, :].astype(np.float32) - palette) ** 2).sum(-1)  # (H, W, colours)
    return (d.argmin(-1) == 0) & (d[..., 0] < 80 ** 2)


def _blob(frame, color, min_px):
    """Centroid (x, y) of the pixels whose nearest palette colour is `color`, or None if fewer than min_px."""
    ys, xs = np.nonzero(_mask(frame, color))
    return (float(xs.mean()), float(ys.mean())) if len(xs) >= min_px else None


def perturb(frame, rng):
    """A uint8 frame (H, W, 3) made wrong the way a small DiT's frames go wrong: one of its objects
    recoloured to a colour the scene lacks, or drawn a second time 2 to 4 object sizes away. None
    if no object is found."""
    H, W, _ = frame.shape
    u = H / 16
    masks = {c: m for c in COLORS if (m := _mask(frame, c)).sum() >= max(4, int(u * u))}
    if not masks:
        return None
    c = list(masks)[rng.integers(len(masks))]
    out = frame.copy()
    if rng.random() < 0.5:
        out[masks[c]] = COLORS[[k for k in COLORS if k not in masks][rng.integers(len(COLORS) - len(masks))]]
    else:
        ys, xs = np.nonzero(masks[c])
        dy, dx = (int(rng.choice([-1, 1]) * rng.uniform(2, 4) * 2 * u) for _ in range(2))
        out[np.clip(ys + dy, 0, H - 1), np.clip(xs + dx, 0, W - 1)] = frame[ys, xs]
    return out


def video_shows(frames, event):
    """True iff the uint8 clip (T, H, W, 3) shows the event done by its object (why_not_shown)."""
    return why_not_shown(frames, event) is None


def why_not_shown(frames, event):
    """None if the uint8 clip (T, H, W, 3) shows the event done by its object, else what fails: by tracking each
    object's coloured blob (pixels nearest that palette colour) against the generator's geometry:
    a placed block ends on the tower at its height, a removed one on the table away from the tower;
    a bouncing ball comes back from the side by at least its radius, a leaving ball is gone at the
    end, a stopping ball is still in the last 5 frames and short of the side. The other objects
    (event["others"]) must end within a radius of where they started: the wrong one moving, or
    changing colour, is not the event. The reasons: "another object lost" (not found, in its colour,
    at the start or the end), "another object moved", "lost" (the acting object not found where it
    must be), "wrong place", "no bounce", "not gone", "not still"."""
    T, H, W, _ = frames.shape
    u = H / 16
    for c in event.get("others", []):
        first, last = (_blob(frames[t], c, min_px=max(4, int(u * u))) for t in (0, -1))
        if first is None or last is None:
            return "another object lost"
        if max(abs(first[0] - last[0]), abs(first[1] - last[1])) > u:
            return "another object moved"
    track = [_blob(f, event["color"], min_px=max(4, int(u * u))) for f in frames]
    end = track[-1]
    if event["world"] == "stack":
        if end is None:
            return "lost"
        if event["action"] == "place":
            ok = abs(end[0] - W * 0.22) < u and abs(end[1] - (H * 14 / 16 - u - 2 * u * event["height"])) < u
        else:
            ok = abs(end[1] - (H * 14 / 16 - u)) < u and abs(end[0] - W * 0.22) > 2 * u
        return None if ok else "wrong place"
    d = 1 if event["side"] == "right" else -1
    xs = [p[0] for p in track if p is not None]
    if event["outcome"] == "leave":
        if not xs or d * (xs[-1] - xs[0]) <= 0:
            return "lost" if not xs else "wrong place"
        return None if end is None else "not gone"
    if end is None or not xs:
        return "lost"
    if event["outcome"] == "bounce":
        return None if d * (max(xs, key=lambda x: d * x) - end[0]) > u else "no bounce"
    last = [p for p in track[-5:] if p is not None]
    still = len(last) == 5 and max(abs(p[0] - end[0]) for p in last) < u / 4
    return None if still and (W - end[0] if d > 0 else end[0]) > u else "not still"


def metrics(samples, captions=None, videos=None):
    """The world's event checks, as the --metrics hook of eval.py and the training scripts: for each
    sample, event_caption / specific_caption (its caption states the event / and names the object
    that acts) and event_video (its uint8 video (T, H, W, 3) shows that object doing it), of what is
    given; None where a sample has no event. -> {name: [bool or None, ...]}"""
    out = {}
    check = lambda fn, xs: [None if not s.get("event") else bool(fn(x, s["event"])) for x, s in zip(xs, samples)]
    if captions is not None:
        out["event_caption"] = check(caption_event, captions)
        out["specific_caption"] = check(caption_specific, captions)
    if videos is not None:
        out["event_video"] = check(video_shows, videos)
    return out


def caption_reward(completions, samples):
    """A stage-1 reward: 1.0 where the completion's caption states the sample's event and names its
    object, else 0.0. Not the paper's reward: a verifier, to tell a weak reward from a weak optimiser."""
    import model
    return [float(caption_specific(model.caption_of(c), s["event"])) for c, s in zip(completions, samples)]


def video_reward(videos, samples):
    """A stage-2 reward: 1.0 where the uint8 video (T, H, W, 3) shows the sample's event, else 0.0."""
    return [float(video_shows(v, s["event"])) for v, s in zip(videos, samples)]


def random_reward(videos, samples):
    """A stage-2 control: a reward in [0, 1) that says nothing about the event, drawn from a hash
    of each video's pixels (so a rerun draws the same)."""
    return [float(np.random.default_rng(int(np.asarray(v, np.uint64).sum())).random()) for v in videos]


# -----------------------------------------------------------------------------
# writing the world

def _write_scene(job):
    seed, split, i, H, W, out, world, vague = job
    x, answers = scene(seed, split, i, H, W, world)
    rel = lambda name: os.path.join("videos", split, name)
    data.write_video(os.path.join(out, rel(f"{i:06d}_in.mp4")), x)
    rows = []
    for a, (q, think, caption, y, event) in enumerate(answers):
        data.write_video(os.path.join(out, rel(f"{i:06d}_{a}.mp4")), y)
        annotation = vague_caption(caption, event) if np.random.default_rng([seed, ["train", "val", "test"].index(split), i, a, 17]).random() < vague else caption
        rows.append({"id": f"{split}{i:06d}_{a}", "kind": "procedural" if event["world"] == "stack" else "predictive",
                     "input_video": rel(f"{i:06d}_in.mp4"), "question": q, "think": think, "caption": annotation,
                     "caption_specific": caption, "target_video": rel(f"{i:06d}_{a}.mp4"), "event": event})
    return rows


def make_shapes(out, n_train, n_val, n_test, height=64, width=112, seed=0, workers=2, world="question", vague=0.5):
    """Write out/{train,val,test}.jsonl and their clips; n_* count samples (a two-question scene
    gives 2). vague: the probability that a line's caption (its annotation) leaves the object unnamed."""
    import multiprocessing
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        os.makedirs(os.path.join(out, "videos", split), exist_ok=True)
        scenes, count = 0, 0
        while count < n:
            count += 2 if scenes % 4 == 3 else 1  # a classic two-future scene may give 1 (a stopping ball): topped up below
            scenes += 1
        jobs = [(seed, split, i, height, width, out, world, vague) for i in range(scenes)]
        with multiprocessing.Pool(workers) as pool:
            rows = [r for rs in pool.imap(_write_scene, jobs, chunksize=16) for r in rs]
        while len(rows) < n:  # a few scenes gave one answer instead of two: add scenes
            rows += _write_scene((seed, split, scenes, height, width, out, world, vague))
            scenes += 1
        with open(os.path.join(out, f"{split}.jsonl.tmp"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[:n])
        os.replace(os.path.join(out, f"{split}.jsonl.tmp"), os.path.join(out, f"{split}.jsonl"))
        print(f"{split}: {n} samples from {scenes} scenes -> {os.path.join(out, split + '.jsonl')}")


# -----------------------------------------------------------------------------
# the models: the preset's tokenizer, the VAE's start, a tiny CLIP

def bpe_tokenizer(texts, vocab_size):
    """Qwen2's byte-level BPE fitted to `texts` (merges up to vocab_size, every byte kept, so any
    text encodes) plus Qwen's special tokens. Deterministic for the same texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from model import QWEN_SPECIAL
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fitted = json.loads(bpe.to_str())["model"]
    vocab = {**fitted["vocab"], **{s: len(fitted["vocab"]) + i for i, s in enumerate(QWEN_SPECIAL)}}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in fitted["merges"]]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=QWEN_SPECIAL[1:])


# The "shapes" preset (`--model random:shapes`; a checkpoint of it carries this dict in meta.json).
# An object is ~1% of a 64x112 frame. A 128-wide VLM trained from scratch only finds it when empty
# patches give zero vision tokens (pixels normalised around the background colour, 235) and the
# text around the 24 video tokens is short (BPE tokens, a one-line system prompt). Its text encoder
# reads the VLM's BPE tokens (each word of the world one token; saved with the checkpoint as
# text_tokenizer/) at the VLM's width: in the question world the caption alone says which object
# acts and which way, and a byte-level encoder 32 wide left the DiT blind to both words. The DiT,
# VAE and vision tower are model.CONFIGS["tiny"]'s but for the widths.
PRESET = dict(
    name="shapes",
    vlm=dict(text_config=dict(vocab_size=None,  # None: the tokenizer's size
                              hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=8192, rope_theta=1000000.0,
                              rms_norm_eps=1e-6, tie_word_embeddings=True,
                              rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
             vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                                fullatt_block_indexes=[0, 1], window_size=112, tokens_per_second=2),
             tie_word_embeddings=True),
    dit=dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
             text_dim=128, freq_dim=32, ffn_dim=512, num_layers=4, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
             latents_mean=[0.0] * 16, latents_std=[1.0] * 16),
    text=dict(vocab_size=None, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4,  # None: the tokenizer's
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    vlm_pixels=(4 * 28 * 28, 16 * 28 * 28),
    tokenizer="shapes:tokenizer", text_tokenizer="shapes:tokenizer",  # one BPE for both
    vlm_norm=(235 / 255, 0.1),  # pixel mean and std of the VLM's processor
    system_prompt="Predict the next event.",
    bpe_vocab=600,  # at most: the Shapes text runs out of merges before (485 tokens with the specials)
    # what the shipped Shapes models were trained with: the VLM's video read as 1 fps, the DiT's unconditional
    # branch on diffusers' Wan example negative prompt, 33 reference frames spread over the input clip, and
    # captions sampled at the paper's temperature 0.7 / top_p 0.9 in their evaluations
    vlm_fps=1.0,
    negative_prompt=(
        "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
        "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
        "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
        "background, three legs, many people in the background, walking backwards"),
    infer=dict(max_new_tokens=160, steps=20, cfg=3.0, height=64, width=112, decoding="sample", ref_clip="uniform"),
)


def tokenizer():
    """The "shapes" preset's tokenizer: BPE fitted to the system prompt and the questions and
    answers of 1000 Shapes scenes (the generator's own text, no files)."""
    import model
    corpus = [PRESET["system_prompt"]] + [q + model.answer_text(t, a) for q, t, a in texts(1000)]
    return bpe_tokenizer(corpus, PRESET["bpe_vocab"])


def keyframe_init(vae):
    """Start a random AutoencoderKLWan as a per-frame autoencoder: each causal 3x3x3 kernel sees
    only the current frame, the encoder's temporal downsampling keeps the last frame of every
    2 (so of every 4-frame chunk) and the decoder's temporal upsampling repeats each frame.
    Trained on single frames (train_vae), which use no other weight, it encodes a
    1 + 4k clip as its frames 0, 4, ..., 4k and decodes each later latent frame as 4 copies.
    (From random time kernels the tiny VAE takes many times longer to learn the objects' colours.)"""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, WanResample) and hasattr(m, "time_conv"):  # (c_out, c, 3, 1, 1), c_out = c or 2c
                w = m.time_conv.weight
                w.zero_()
                m.time_conv.bias.zero_()
                w[:, :, -1, 0, 0] = torch.eye(w.shape[1]).repeat(w.shape[0] // w.shape[1], 1)
        for name, m in vae.named_modules():
            if isinstance(m, WanCausalConv3d) and m.kernel_size[0] == 3 and not name.endswith("time_conv"):
                m.weight[:, :, :-1] = 0  # the earlier frames' taps
                m.weight[:, :, -1] *= 3 ** 0.5  # the fan-in of a 3x3 kernel, as a 2D init would have


def vae_loss(vae, clips, fg_weight, kl_weight, device, generator=None):
    """train_vae's loss: on one random frame of each uint8 clip (B, T, H, W, 3), the MSE in [-1, 1]
    pixels of the posterior mean's reconstruction (the latents the DiT sees), with foreground pixels
    (off the frame's median colour by more than 0.1) weighted 1 + fg_weight, + kl_weight *
    KL(posterior || N(0, I)) per element. A frame is a whole chunk of the causal VAE: it trains every
    weight that keyframe_init leaves to train."""
    import torch
    pick = torch.randint(clips.shape[1], (clips.shape[0],), generator=generator)
    x = data.to_tensor(clips[torch.arange(clips.shape[0]), pick, None]).to(device)  # (B, 3, 1, H, W)
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mode()).sample
    median = x.flatten(2).median(-1).values[:, :, None, None, None]
    w = 1 + fg_weight * ((x - median).abs().amax(1, keepdim=True) > 0.1).float()
    kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).mean()
    return (w * (rec - x) ** 2).mean() / w.mean() + kl_weight * kl


def latent_stats(vae, clips, device):
    """Per-channel mean and std of a VAE's latents over uint8 clips (T, H, W, 3), this rank's, pooled
    over all ranks: what normalises a VAE trained here, as Wan's ships its own in its config."""
    import torch

    import common
    with torch.no_grad():
        z = torch.cat([vae.encode(data.to_tensor(c[None]).to(device)).latent_dist.mode() for c in clips])
    z = z.transpose(0, 1).flatten(1).double()  # (C, N)
    s, s2, n = (torch.tensor(t, dtype=torch.float64) for t in
                common.all_sum([z.sum(1).tolist(), (z ** 2).sum(1).tolist(), [z.shape[1]] * len(z)]))
    mean = s / n
    return mean.tolist(), (s2 / n - mean ** 2).clamp_min(1e-12).sqrt().tolist()


def train_vae(args):
    """`python shapes.py train-vae`: the Shapes VDM's VAE from random weights (keyframe_init), trained
    alone on single frames of the clips (vae_loss), before the DiT's SFT reads its latents
    (sft_vdm.py --model <out>/last). Runs under torchrun too (the gradients averaged by hand). Writes
    <out>/last, a checkpoint of the whole VDM with the latents' statistics (latent_stats), and
    <out>/log.jsonl; every --val-every steps the val loss and reconstructions in <out>/samples."""
    import time

    import checkpoint
    import common
    last = os.path.join(args.out, "last")
    resume = args.resume and checkpoint.checkpoint_exists(last)
    train, val = data.read_manifests(args, min_frames=args.frames)  # before torch: a wrong path fails at once

    import torch
    import torch.distributed as dist
    rank, world, device = common.compute_init(args.device)
    os.makedirs(args.out, exist_ok=True)
    clips = data.ClipDataset(train, ("clip", "target"), args.frames, args.height, args.width, ref_clip=args.ref_clip)
    preset, (_, vdm) = common.load_model(last if resume else "random:shapes", need=("vdm",), dtype=torch.float32)
    vae = vdm.vae.to(device).train()
    if not resume:
        keyframe_init(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    start = 0
    if resume:
        state = common.load_train_state(last)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    else:
        torch.manual_seed(args.seed + rank)
    logger = common.Logger(args.out, args, rank, start)
    loss_of = lambda b, g=None: vae_loss(vae, torch.cat([b["clip"], b["target"]]), args.fg_weight, args.kl_weight,
                                         device, g)

    def save(step):
        vdm.set_latent_stats(*latent_stats(vae, [clips[i]["target"] for i in range(len(train))[:16][rank::world]], device))
        state = common.train_state(step, optimizer.state_dict())
        if rank == 0:
            meta = {"preset": preset, "script": "shapes train-vae", "step": step, "flags": vars(args),
                    "git": common.git_hash()}
            checkpoint.save_checkpoint(last, None, vdm, meta, ("dit", "vae", "text_encoder"),
                                       extra={"train_state.pt": state})
        if world > 1:
            dist.barrier()

    @torch.no_grad()
    def validate(step):
        """The loss at fixed frames, and --val-render reconstructions beside their clips."""
        vae.eval()
        mine = lambda n: [val[(rank + world * i) % len(val)] for i in range((n + world - 1) // world)]
        g = torch.Generator().manual_seed(1234 + rank)
        batches = [data.collate([it]) for s in mine(args.val_loss_samples) if (it := clips.try_load(s)) is not None]
        losses = [loss_of(b, g).item() for b in batches]
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        for s in mine(args.val_render):
            if (it := clips.try_load(s)) is not None:
                x = data.to_tensor(it["target"][None]).to(device)
                rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
                data.write_video(os.path.join(args.out, "samples", f"step{step:06d}_{s['id']}.mp4"),
                                 data.to_uint8(torch.cat([x, rec], dim=-1)[0]))
        vae.train()
        return {"val/loss": common.all_mean(losses)}

    end = min(args.steps, args.stop_at) if args.stop_at else args.steps
    sampler = data.StepSampler(len(clips), args.batch_size, rank, world, args.seed, start, end)
    t0, stop = time.time(), common.Stop()
    for step, batch in zip(range(start, end), common.loader(clips, sampler, args.workers, data.collate)):
        lr = common.set_lr(optimizer, step, args)
        loss = loss_of(batch)
        loss.backward()
        if world > 1:
            for p in vae.parameters():
                if p.grad is not None:  # None on every rank alike (the time convolutions, on single frames)
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        stopped = stop() and done < end
        if stopped:
            end = done
        if done % args.log_every == 0 or done == end:
            logger.log({"loss": common.all_mean([loss.item()]), "grad_norm": float(grad_norm), "lr": lr,
                        "sec_per_step": (time.time() - t0) / (done - start)}, done)
        if val and ((args.val_every and done % args.val_every == 0) or done == end) and not stopped:
            logger.log(validate(done), done)
        if done % args.save_every == 0 or done == end:
            save(done)
        if done == end:
            break
    common.finish(list(vae.parameters()), end, args.steps, t0, last, logger)


# A CLIP small enough to train on a CPU, for a world OpenAI's CLIP never saw (rewards.load_tiny_clip: open_clip's
# own CLIP class, whole frames at image_size, byte tokens). Saved as <dir>/clip.json + clip.safetensors.
TINY_CLIP = dict(embed_dim=64, quick_gelu=False,
                 vision_cfg=dict(image_size=[64, 112], patch_size=8, width=64, layers=3, head_width=32),
                 text_cfg=dict(context_length=96, vocab_size=259, width=64, heads=2, layers=2))


def train_clip(manifest, out, steps=1000, batch_size=64, lr=1e-3, frames_per_clip=5, seed=0, height=64, width=112,
               save_every=100, hard_negatives=0, pool=1000, perturbed=0):
    """Contrastive training of a tiny CLIP on (target frame, caption) pairs of a manifest: CLIP-V
    then compares what this world's frames show, CLIP-T whether a frame fits a caption.
    hard_negatives > 0 adds to each batch that many training scenes with every future they could have
    (scene(every=True), drawn from the first `pool` training scenes of world seed 0), each future's
    frame at the same late time with its named caption: the same scene with another object moved, or
    the same object moved the other way, is then a negative, so the embeddings must tell which object
    did what. perturbed > 0 adds that many of each batch's frames made wrong (perturb: an object
    recoloured or doubled) as images no caption fits. Writes
    out/clip.json + out/clip.safetensors at the end (clip.safetensors, written last, means done),
    and out/train_state.pt every save_every steps and when Ctrl-C or SIGTERM stops it: a rerun
    resumes from there exactly. -> the losses of this call's steps."""
    samples, _ = data.read_manifest(manifest)  # before torch: a wrong path fails at once

    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm import tqdm

    import checkpoint
    import common
    import rewards
    frames = torch.stack([torch.from_numpy(data.load_clip(s["target_video"], frames_per_clip, height, width))
                          for s in samples])  # (N, K, H, W, 3) uint8, K frames spread over each target
    cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": [height, width]}}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)  # the perturbations; its state is saved with torch's
    net = rewards.build_tiny_clip(cfg)
    clip = rewards.CLIP.__new__(rewards.CLIP)  # only its preprocessing, on this model
    clip.model, clip.crop, clip.size, clip.device, clip.dtype = net, False, (height, width), torch.device("cpu"), torch.float32
    late = np.linspace(N_OUT // 2, N_OUT - 1, 3).round().astype(int)  # when the futures of a scene differ
    futures = [[(caption, y[late]) for _, _, caption, y, _ in scene(0, "train", k, height, width, every=True)[1]]
               for k in range(pool if hard_negatives else 0)]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.1)
    os.makedirs(out, exist_ok=True)
    common.same_settings(os.path.join(out, "train_settings.json"),  # a state of other settings is not resumed
                         dict(manifest=os.path.abspath(manifest), steps=steps, batch_size=batch_size, lr=lr,
                              frames_per_clip=frames_per_clip, seed=seed, height=height, width=width,
                              hard_negatives=hard_negatives, pool=pool, perturbed=perturbed))
    state_path, start = os.path.join(out, "train_state.pt"), 0
    if os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        rng.bit_generator.state = state["np_rng"]
        start = state["step"]
        print(f"resumed from {state_path} at step {start}", flush=True)

    def save_state(step):
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                    "np_rng": rng.bit_generator.state, "step": step}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    stop, losses = common.Stop(), []
    try:
        progress = tqdm(range(start, steps), initial=start, total=steps, desc="train-clip")
        for step in progress:
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
            i = torch.randint(len(samples), (batch_size,))
            imgs = [frames[i, torch.randint(frames_per_clip, (batch_size,))]]
            caps = [samples[j]["caption"] for j in i.tolist()]
            if hard_negatives:  # scenes with every future, each at one late frame
                for k, t in zip(torch.randint(len(futures), (hard_negatives,)).tolist(),
                                torch.randint(3, (hard_negatives,)).tolist()):
                    imgs.append(torch.from_numpy(np.stack([y[t] for _, y in futures[k]])))
                    caps += [c for c, _ in futures[k]]
            wrong = [w for f in imgs[0][:perturbed].numpy() if (w := perturb(f, rng)) is not None]
            imgs += [torch.from_numpy(np.stack(wrong))] if wrong else []
            a = F.normalize(net.encode_image(clip.preprocess(torch.cat(imgs))), dim=-1)
            b = F.normalize(net.encode_text(rewards.byte_tokens(caps)), dim=-1)
            same = torch.tensor([[x == y for y in caps] for x in caps]).float()
            logits = net.logit_scale.exp() * b @ a.T  # (captions, images): the wrong images come last
            target = same / same.sum(1, keepdim=True)  # identical captions are all positives
            image_to_text = -(target * logits[:, :len(caps)].T.log_softmax(1)).sum(1).mean()
            text_to_image = -(F.pad(target, (0, len(wrong))) * logits.log_softmax(1)).sum(1).mean()
            loss = (image_to_text + text_to_image) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % save_every == 0 or stop.asked:
                save_state(step + 1)
            if stop.asked:
                print(f"stopped at step {step + 1} of {steps}; rerun the command to resume", flush=True)
                return losses
    finally:
        stop.close()
    with open(os.path.join(out, "clip.json"), "w") as f:
        json.dump(cfg, f)
    path = os.path.join(out, "clip.safetensors")  # written last and atomically: its presence means done
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path + ".tmp")
    checkpoint.respect_umask(path + ".tmp")
    os.replace(path + ".tmp", path)
    if os.path.isfile(state_path):
        os.remove(state_path)
    return losses


def event_preference(scores, shows, group_size):
    """How well a reward ranks the videos that show the event above those that do not, inside the
    groups where both occur (the only groups whose advantages can tell them apart). scores, shows:
    (N,) laid out group after group. -> {"pairs": P(an event video outscores a non-event video of its
    group), ties count half; "r": the mean within-group Pearson correlation of score and shows;
    "mixed_groups": how many groups have both}"""
    s = np.asarray(scores, np.float64).reshape(-1, group_size)
    e = np.asarray(shows, bool).reshape(-1, group_size)
    wins, pairs, rs = 0.0, 0, []
    for g, ev in zip(s, e):
        if ev.all() or not ev.any():
            continue
        diff = g[ev][:, None] - g[~ev][None, :]
        wins += (diff > 0).sum() + 0.5 * (diff == 0).sum()
        pairs += diff.size
        rs.append(float(np.corrcoef(g, ev)[0, 1]) if g.std() > 0 else 0.0)
    return {"pairs": wins / pairs if pairs else None, "r": float(np.mean(rs)) if rs else None, "mixed_groups": len(rs)}


def reward_check(vdm_path, manifest, clip_paths, out, prompts=16, group_size=8, steps=20, cfg=3.0, noise_level=0.7,
                 seed=0):
    """Does stage 2's reward see the event? The VDM samples group_size videos per prompt, as stage 2's
    rollouts are sampled (the SDE, from the prompt's caption and references), for the first `prompts`
    samples of the manifest; each video gets the event check (why_not_shown) and, with each CLIP of
    clip_paths, r_v2 (CLIP-V to the ground truth), r_c2 (CLIP-T to the caption) and their stage-2 sum
    (each normalised as rewards.combine does). Writes out (JSON): the settings, each video's numbers,
    why the others fail, and event_preference of each reward with each CLIP. -> that dict"""
    import torch
    from tqdm import tqdm

    import checkpoint
    import rewards
    samples, _ = data.read_manifest(manifest)
    samples = samples[:prompts]
    _, vdm = checkpoint.load(vdm_path, need=("vdm",), dtype=torch.float32, dit_dtype=torch.float32)
    scorers = {path: rewards.CLIP(path) for path in clip_paths}
    H, W = (checkpoint.preset_of(vdm_path)["infer"][k] for k in ("height", "width"))
    dataset = data.ClipDataset(samples, ("clip", "target"), 33, H, W, ref_clip=checkpoint.ref_clip_of(vdm_path))
    gen = torch.Generator().manual_seed(seed)
    raw, why = {path: {"clip_v": [], "clip_t": []} for path in clip_paths}, []
    for i in tqdm(range(len(samples)), desc="reward-check"):
        item, G = dataset[i], group_size
        with torch.no_grad():
            text = vdm.encode_text([item["caption"]]).expand(G, -1, -1)
            refs = vdm.ref_latents(vdm.encode_video(data.to_tensor(item["clip"][None]))).expand(G, -1, -1, -1, -1)
            xs, _ = vdm.sample_sde(text, vdm.negative_text(G), refs, 33, H, W, steps, cfg, noise_level=noise_level,
                                   generator=gen)
            videos = [data.to_uint8(v) for v in vdm.decode(xs[:, -1])]
        for path, clip in scorers.items():
            raw[path]["clip_v"] += clip.clip_v(videos, [item["target"]] * G).tolist()
            raw[path]["clip_t"] += clip.clip_t(videos, [item["caption"]] * G).tolist()
        why += [why_not_shown(v, item["event"]) for v in videos]
    shows = [w is None for w in why]
    group = lambda xs, i: xs[i * group_size:(i + 1) * group_size]
    preference, by_prompt = {}, [{"id": s["id"], "caption": s["caption"], "why": group(why, i)} for i, s in enumerate(samples)]
    for path, r in raw.items():
        total = rewards.combine({k: torch.tensor(v) for k, v in r.items()}, {}, group_size).tolist()
        preference[path] = {name: event_preference(v, shows, group_size)
                            for name, v in (("r_v2", r["clip_v"]), ("r_c2", r["clip_t"]), ("r_v2 + r_c2", total))}
        for i, row in enumerate(by_prompt):
            row[path] = {"r_v2": [round(x, 5) for x in group(r["clip_v"], i)], "r_c2": [round(x, 5) for x in group(r["clip_t"], i)]}
    result = {"settings": dict(vdm=vdm_path, manifest=manifest, clips=list(clip_paths), prompts=len(samples),
                               group_size=group_size, steps=steps, cfg=cfg, noise_level=noise_level, seed=seed),
              "event_videos": int(sum(shows)), "videos": len(shows),
              "why_not": {w: why.count(w) for w in sorted(set(why) - {None})},
              "preference": preference, "videos_by_prompt": by_prompt}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def split_by_caption(results):
    """eval.py's results.json (a Shapes manifest) -> one table row: the share of captions that name
    the object that acts, and how often the video shows the event and what CLIP-V it scores when the
    caption names the object, states the event without naming it (vague), or misses the event."""
    per = results["samples"]
    groups = {"named": [q for q in per if q["specific_caption"]],
              "vague": [q for q in per if q["event_caption"] and not q["specific_caption"]],
              "no event": [q for q in per if not q["event_caption"]]}
    cell = lambda qs, k: f"{np.mean([q[k] for q in qs]):.3f} ({len(qs)})" if qs else "-"
    return ([f"{len(groups['named']) / len(per):.3f}"] + [cell(groups[g], "event_video") for g in groups]
            + [cell(groups[g], "clip_v") for g in ("named", "vague")])


if __name__ == "__main__":
    import argparse

    import common
    parser = argparse.ArgumentParser(description="The Shapes world: its data, and a tiny CLIP for it.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sh = sub.add_parser("data", help="generate the world: clips and a manifest per split")
    sh.add_argument("--out", default="data/shapes", help="output directory")
    # the defaults are what config/shapes.py and the shipped Shapes models were made with
    sh.add_argument("--n-train", type=int, default=4000, help="training samples")
    sh.add_argument("--n-val", type=int, default=100, help="validation samples")
    sh.add_argument("--n-test", type=int, default=200, help="test samples")
    sh.add_argument("--height", type=int, default=64, help="frame height")
    sh.add_argument("--width", type=int, default=112, help="frame width")
    sh.add_argument("--seed", type=int, default=0, help="the world's seed")
    sh.add_argument("--world", default="question", choices=WORLDS,
                    help="question: the question decides which object acts; classic: the input decides")
    sh.add_argument("--vague", type=float, default=0.5, help="probability that a caption leaves the object unnamed")
    sh.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes")
    tc = sub.add_parser("train-clip", help="contrastive training of a tiny CLIP on a manifest's target frames and captions")
    tc.add_argument("--train", default="data/shapes/train.jsonl", help="training manifest")
    tc.add_argument("--out", default="data/shapes/clip", help="output directory (clip.json + clip.safetensors)")
    tc.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    tc.add_argument("--batch-size", type=int, default=64, help="pairs per step")
    tc.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    tc.add_argument("--height", type=int, default=64, help="frame height the CLIP sees")
    tc.add_argument("--width", type=int, default=112, help="frame width the CLIP sees")
    tc.add_argument("--seed", type=int, default=0, help="seed")
    tc.add_argument("--save-every", type=int, default=100, help="write <out>/train_state.pt every N steps (a rerun resumes)")
    tc.add_argument("--hard-negatives", type=int, default=0, help="scenes with every future they could have, added to each batch")
    tc.add_argument("--pool", type=int, default=1000, help="the training scenes those are drawn from")
    tc.add_argument("--perturbed", type=int, default=0, help="frames of each batch also added made wrong (an object recoloured or doubled)")
    tv = sub.add_parser("train-vae", help="the VDM's VAE from random weights, on single frames (then sft_vdm.py --model <out>/last)")
    tv.add_argument("--train", default="data/shapes/train.jsonl", help="training manifest")
    tv.add_argument("--val", default="data/shapes/val.jsonl", help="validation manifest")
    tv.add_argument("--skip-bad", action="store_true", help="skip and count bad manifest lines / clips")
    tv.add_argument("--frames", type=int, default=33, help="frames of a clip (4k + 1)")
    tv.add_argument("--height", type=int, default=64, help="frame height")
    tv.add_argument("--width", type=int, default=112, help="frame width")
    tv.add_argument("--ref-clip", default="uniform", choices=data.REF_CLIPS, help="the input frames read (data.clip_indices)")
    tv.add_argument("--batch-size", type=int, default=2, help="clips per rank per step (a frame of each clip and of its target)")
    tv.add_argument("--fg-weight", type=float, default=10.0, help="extra weight of the pixels off the frame's median colour")
    tv.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term")
    tv.add_argument("--val-every", type=int, default=500, help="validate every N steps (0 = only at the end)")
    tv.add_argument("--val-loss-samples", type=int, default=32, help="validation samples for the loss")
    tv.add_argument("--val-render", type=int, default=8, help="reconstructions written to <out>/samples")
    common.add_run_flags(tv, out="out/shapes/vae", steps=1500)
    tv.set_defaults(lr=2e-3, warmup=20, save_every=500, log_every=50, workers=1)  # what the shipped VAE was trained with
    rc = sub.add_parser("reward-check", help="does stage 2's reward prefer the videos that show the event?")
    rc.add_argument("--vdm", default="shapes-sft", help="the VDM whose rollouts are scored")
    rc.add_argument("--manifest", default="data/shapes/val.jsonl", help="prompts: the first --prompts samples")
    rc.add_argument("--clip", default="weights/shapes-sft/clip", help="the CLIP of the rewards (several: comma-separated)")
    rc.add_argument("--out", default="docs/results/reward_check.json", help="the result (JSON)")
    rc.add_argument("--prompts", type=int, default=16, help="prompts")
    rc.add_argument("--group-size", type=int, default=8, help="videos per prompt")
    rc.add_argument("--sample-steps", type=int, default=20, help="SDE steps")
    rc.add_argument("--cfg", type=float, default=3.0, help="guidance scale")
    rc.add_argument("--seed", type=int, default=0, help="seed of the rollouts' noise")
    sp = sub.add_parser("split", help="eval.py's Shapes results split by whether the caption names the object")
    sp.add_argument("results", nargs="+", help="results.json files of eval.py on a Shapes manifest")
    a = parser.parse_args()
    if a.cmd == "split":
        print("| run | named | event (video), named | vague | no event | CLIP-V, named | vague |\n|---|---|---|---|---|---|---|")
        for path in a.results:
            with open(path) as f:
                print(f"| {os.path.basename(os.path.dirname(path))} | " + " | ".join(split_by_caption(json.load(f))) + " |")
    elif a.cmd == "reward-check":
        r = reward_check(a.vdm, a.manifest, a.clip.split(","), a.out, a.prompts, a.group_size, a.sample_steps, a.cfg,
                         seed=a.seed)
        print(f"{r['event_videos']} of {r['videos']} videos show the event; the others: {r['why_not']}")
        for path, pref in r["preference"].items():
            print(f"{path}: in groups with both, P(an event video scores higher):")
            for name, p in pref.items():
                print(f"  {name}: {p['pairs']:.3f} (within-group r {p['r']:.3f}, {p['mixed_groups']} groups)")
    elif a.cmd == "train-vae":
        train_vae(a)
    elif a.cmd == "data":
        make_shapes(a.out, a.n_train, a.n_val, a.n_test, a.height, a.width, a.seed, a.workers, a.world, a.vague)
    else:
        try:
            train_clip(a.train, a.out, a.steps, a.batch_size, a.lr, seed=a.seed, height=a.height, width=a.width,
                       save_every=a.save_every, hard_negatives=a.hard_negatives, pool=a.pool, perturbed=a.perturbed)
        except (data.ManifestError, data.VideoError) as e:
            raise SystemExit(f"error: --train {e}")
