"""Drawing a KanjiVG character as a handwritten 28x28 image: the seeded "drawers" and the rasteriser.

A character arrives as its strokes in writing order, each a chain of cubic Bézier curves on
KanjiVG's 109 x 109 canvas (:func:`fewshot_lightning.data.datasets.svg_path.parse_path`). Each
is flattened once to a polyline (pieces of about a pixel) and then drawn ``instances`` times,
each time by a different "hand", as Omniglot's 20 drawers per character (Lake, Salakhutdinov
& Tenenbaum, Science 2015). A hand, in fractions of the image side unless stated:

- the whole character: a smooth warp (quadratic displacements of up to ±0.5 x (x² - mean),
  xy, (y² - mean) in each direction, in canvas units centred on the middle: they change its
  proportions, one side or the top drawn wider than the other, taper it and bend its lines),
  then rotation within ±12°, scale 0.7-0.9 of the canvas (KanjiVG's glyphs span about 0.77
  of it, so a glyph spans 54-69% of the image), aspect 0.9-1.1, horizontal shear ±0.2, shift
  ±6%, and a pen width of 4.5-7.5% (1.3-2.1 px at 28 px, Omniglot's pen at that size);
- every stroke: each end moved by up to ±2.5%, the start and the end each cut short or drawn
  on by up to 12% of the stroke's length (along its own direction at that end), a bow of up
  to ±8% and an S-shaped wave of up to ±5% of the stroke's chord, sideways, that bend it
  smoothly (zero at both ends, so the strokes still meet where they should), and the pen
  width varied ±15%.

The warp was added to calibrate the benchmark against Omniglot (Prototypical Networks reach
98.8% 5-way 1-shot there; Snell et al., NeurIPS 2017): with everything else but the warp, the
README's 200-step ProtoNet run already scored 99.1% 5-way 1-shot, with it 97.9% (see
``docs/benchmarks.md``).

Strokes are round-capped; a pixel's ink is ``clip(radius + 0.5 - distance, 0, 1)`` for its
centre's distance to the nearest stroke (full within the pen radius, fading to zero over one
pixel: anti-aliased), white (255) on black (0), uint8.

Reproducibility. The randomness of character ``c`` comes only from
``numpy.random.default_rng([seed, ord(c)])``, its uniform draws laid out instance by
instance, so the images of a character do not depend on which other characters are built
and instance ``i`` does not depend on ``instances``. Only IEEE-754 operations that are exactly
rounded on every platform are used: uniform draws, + - * /, sqrt, floor/ceil/rint, min/max
and comparisons, each as its own numpy ufunc call (one rounding per operation, never a
fused multiply-add). The rotation comes from the rational parametrisation
``cos = (1 - t²) / (1 + t²)``, ``sin = 2t / (1 + t²)`` of ``t = tan(angle / 2)``, not from
sin/cos (whose last bit differs between math libraries); there are no matrix products or
sums whose order could vary between BLAS or SIMD builds (the only running sums, the arc
lengths of a polyline, are sequential ``cumsum``), and ink from overlapping strokes is
combined with ``max``, which does not depend on order. So the bytes are the same on every
machine.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Tuple

import numpy as np

from .svg_path import control_polygon_lengths, flatten

#: Side of KanjiVG's canvas (its SVG viewBox is 0 0 109 109).
CANVAS = 109.0

# The hand, in fractions of the image side unless stated. Rotation is drawn as
# t = tan(angle / 2) within ±0.105 (angle within ±12°); see the module docstring.
HALF_ANGLE_TAN = 0.105
SCALE = (0.7, 0.9)  # of the canvas; few glyphs touch the image border after rotation and shift
ASPECT = (0.9, 1.1)
SHEAR = 0.2
SHIFT = 0.06
PEN_WIDTH = (0.045, 0.075)
# Per stroke.
ENDPOINT_JITTER = 0.025
STROKE_END = 0.12  # trim (+) or extension (-) of each end, in stroke lengths
BOW = 0.08  # in chord lengths, at the middle of the stroke
WAVE = 0.05  # in chord lengths, at the wave's two extremes
STROKE_WIDTH_FACTOR = (0.85, 1.15)
WARP = 0.5  # coefficient of each quadratic displacement term, in canvas units

# Uniform draws per instance: 13 for the whole character (7 for the affine map and the pen,
# then 6 for the warp), then 9 per stroke.
_CHARACTER_DRAWS = 13
_STROKE_DRAWS = 9
# u(1-u)(1-2u) peaks at ±sqrt(3)/18 (u = 1/2 ∓ sqrt(3)/6); this scales the peaks to ±1.
_WAVE_NORM = 6 * math.sqrt(3)
# Mean of x² over a glyph (uniform over ±0.4 of the canvas): subtracted so the warp keeps it centred.
_MEAN_SQUARE = 0.16 / 3
# Target length of a flattening piece, in pixels at scale 1: short enough that a curve looks
# smooth, long enough to keep the number of segments (the rasteriser's cost) small.
_PIECE_PIXELS = 1.0


class Polyline(NamedTuple):
    """A character's strokes flattened, all strokes in one array: ``points`` ``[P, 2]`` (x, y
    in image sides, centred on 0), ``stroke`` ``[P]`` (the stroke each point belongs to, in
    writing order) and ``along`` ``[P]`` (arc-length fraction within its stroke, 0 at its start
    and 1 at its end)."""

    points: np.ndarray
    stroke: np.ndarray
    along: np.ndarray


def flatten_strokes(strokes: Sequence[np.ndarray], image_size: int) -> Polyline:
    """Flatten a character's strokes (each ``[n, 4, 2]`` cubics on the 109-unit canvas) into
    pieces of at most about a pixel at ``image_size`` (a cubic's piece count comes from its
    control polygon, which bounds its length)."""
    points, owners, along = [], [], []
    for index, cubics in enumerate(strokes):
        pieces = np.maximum(np.ceil(control_polygon_lengths(cubics) * (image_size / CANVAS / _PIECE_PIXELS)), 1)
        stroke_points = flatten(cubics, pieces.astype(np.int64))
        step = stroke_points[1:] - stroke_points[:-1]
        step_length = np.sqrt(step[:, 0] * step[:, 0] + step[:, 1] * step[:, 1])
        # A degenerate cubic (all four points equal) gives repeated points: keep one.
        keep = np.concatenate([[True], step_length > 0])
        stroke_points, step_length = stroke_points[keep], step_length[step_length > 0]
        if len(stroke_points) < 2:
            raise ValueError(f"Stroke {index + 1} has zero length: the stroke data is damaged.")
        arc = np.concatenate([[0.0], np.cumsum(step_length)])
        points.append((stroke_points - CANVAS / 2) / CANVAS)
        owners.append(np.full(len(stroke_points), index))
        along.append(arc / arc[-1])
    return Polyline(np.concatenate(points), np.concatenate(owners), np.concatenate(along))


def _between(uniform: np.ndarray, bounds: Tuple[float, float]) -> np.ndarray:
    return bounds[0] + (bounds[1] - bounds[0]) * uniform


def _symmetric(uniform: np.ndarray, limit: float) -> np.ndarray:
    return (2 * uniform - 1) * limit


def render_character(
    strokes: Sequence[np.ndarray], codepoint: int, instances: int, image_size: int, seed: int
) -> np.ndarray:
    """``instances`` handwritten renderings of one character, ``[instances, image_size, image_size]`` uint8.

    ``strokes`` are the character's strokes in writing order, each ``[n, 4, 2]`` cubic Bézier
    segments on the 109-unit KanjiVG canvas; the randomness comes only from
    ``default_rng([seed, codepoint])`` (see the module docstring).
    """
    line = flatten_strokes(strokes, image_size)
    num_strokes = len(strokes)
    draws = np.random.default_rng([seed, codepoint]).random((instances, _CHARACTER_DRAWS + _STROKE_DRAWS * num_strokes))
    hand = draws[:, :_CHARACTER_DRAWS].T[..., None]  # 13 x [I, 1]
    per_stroke = draws[:, _CHARACTER_DRAWS:].reshape(instances, num_strokes, _STROKE_DRAWS)
    # Each stroke's draws, spread to its points: [I, P] each.
    start_x, start_y, end_x, end_y, trim_start, trim_end, bow, wave, width = (
        per_stroke[:, line.stroke, k] for k in range(_STROKE_DRAWS)
    )

    # Cut short or draw on each end: the drawn stroke runs from fraction `first` to `last` of
    # the source stroke; a point at fraction v of the drawn stroke sits at source fraction
    # first + v * (last - first), found on (or extrapolated past the ends of) the polyline.
    v = line.along
    first = _symmetric(trim_start, STROKE_END)
    last = 1 - _symmetric(trim_end, STROKE_END)
    wanted = first + v * (last - first)
    x, y = _point_at(line, wanted)

    # Move the ends and bend between them: offsets that vary smoothly along the stroke.
    first_point = np.searchsorted(line.stroke, np.arange(num_strokes))
    last_point = np.searchsorted(line.stroke, np.arange(num_strokes), side="right") - 1
    chord = line.points[last_point] - line.points[first_point]
    # (-chord_y, chord_x) is the chord turned by 90°, as long as the chord: no normalisation needed.
    normal_x, normal_y = -chord[line.stroke, 1], chord[line.stroke, 0]
    sideways = _symmetric(bow, BOW) * (4 * v * (1 - v)) + _symmetric(wave, WAVE) * (_WAVE_NORM * v * (1 - v) * (1 - 2 * v))
    x = x + (1 - v) * _symmetric(start_x, ENDPOINT_JITTER) + v * _symmetric(end_x, ENDPOINT_JITTER) + sideways * normal_x
    y = y + (1 - v) * _symmetric(start_y, ENDPOINT_JITTER) + v * _symmetric(end_y, ENDPOINT_JITTER) + sideways * normal_y

    # A smooth warp of the whole character: quadratic displacements that change its
    # proportions (one side or the top wider than the other), taper it and bend its lines.
    xx, xy, yy = x * x - _MEAN_SQUARE, x * y, y * y - _MEAN_SQUARE
    warp = [_symmetric(hand[k], WARP) for k in range(7, 13)]
    x, y = (
        x + warp[0] * xx + warp[1] * xy + warp[2] * yy,
        y + warp[3] * xx + warp[4] * xy + warp[5] * yy,
    )

    half_tan = _symmetric(hand[0], HALF_ANGLE_TAN)
    cos = (1 - half_tan * half_tan) / (1 + half_tan * half_tan)
    sin = 2 * half_tan / (1 + half_tan * half_tan)
    scale, aspect = _between(hand[1], SCALE), _between(hand[2], ASPECT)
    scale_x, scale_y = scale * aspect, scale / aspect
    shear = _symmetric(hand[3], SHEAR)
    # rotation @ scale @ shear, written out entry by entry (see the module docstring on matrix products).
    a11, a12 = cos * scale_x, cos * scale_x * shear - sin * scale_y
    a21, a22 = sin * scale_x, sin * scale_x * shear + cos * scale_y
    shift_x, shift_y = _symmetric(hand[4], SHIFT), _symmetric(hand[5], SHIFT)
    pixel_x = (a11 * x + a12 * y + shift_x + 0.5) * image_size
    pixel_y = (a21 * x + a22 * y + shift_y + 0.5) * image_size
    radius = 0.5 * image_size * _between(hand[6], PEN_WIDTH) * _between(width, STROKE_WIDTH_FACTOR)

    # Segments join consecutive points of the same stroke.
    joined = line.stroke[1:] == line.stroke[:-1]
    segments = [
        a.astype(np.float32)
        for a in (pixel_x[:, :-1][:, joined], pixel_y[:, :-1][:, joined], pixel_x[:, 1:][:, joined],
                  pixel_y[:, 1:][:, joined], radius[:, 1:][:, joined])
    ]
    return rasterise(*segments, image_size)


def _point_at(line: Polyline, wanted: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Points at arc fractions ``wanted`` (``[I, P]``; point ``j`` asks within stroke
    ``line.stroke[j]``), linearly interpolated on the polyline; a fraction below 0 or above 1
    extends the stroke's first or last piece in a straight line."""
    # Strokes are 2 apart in this key and fractions within [0, 1], so one sorted search finds
    # the piece within the right stroke.
    key = 2.0 * line.stroke + line.along
    clipped = np.clip(wanted, 0.0, 1.0)
    piece = np.searchsorted(key, 2.0 * line.stroke + clipped, side="right") - 1
    # Clamp to the stroke's own pieces (the last point starts none; fractions outside [0, 1]
    # extrapolate the first or last piece).
    stroke_first = np.searchsorted(line.stroke, line.stroke)
    stroke_last_piece = np.searchsorted(line.stroke, line.stroke, side="right") - 2
    piece = np.minimum(np.maximum(piece, stroke_first), stroke_last_piece)
    start, end = line.along[piece], line.along[piece + 1]
    fraction = (wanted - start) / (end - start)
    x0, y0 = line.points[piece, 0], line.points[piece, 1]
    x1, y1 = line.points[piece + 1, 0], line.points[piece + 1, 1]
    return x0 + fraction * (x1 - x0), y0 + fraction * (y1 - y0)


def rasterise(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, radius: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased round-capped segments: ``[I, G]`` float32 pixel coordinates and radii (pixel
    ``(r, c)`` has its centre at ``(c + 0.5, r + 0.5)``) -> ``[I, size, size]`` uint8.

    Coverage of a pixel is ``clip(radius + 0.5 - distance, 0, 1)`` for its centre's distance to
    the segment, maximised over segments (overlapping strokes do not add ink). Each segment is
    evaluated only on the square of pixels it can reach, so the cost grows with the length of
    ink rather than with segments times image area.
    """
    f32 = np.float32
    instances, per_instance = x0.shape
    x0, y0, x1, y1, radius = (a.reshape(-1) for a in (x0, y0, x1, y1, radius))
    reach = radius + f32(0.5)
    dx, dy = x1 - x0, y1 - y0
    # The square must span every segment's reach; a larger one only adds pixels of zero ink.
    span = int(np.ceil(max(np.max(np.abs(dx)), np.max(np.abs(dy))) + 2 * np.max(reach))) + 2
    # Squares are drawn on a canvas padded by `span` on every side, then cropped. A square that
    # would fall off the canvas is moved onto its edge: its segment is then at least `span`
    # pixels outside the image, so none of its ink would land in the image anyway.
    side = size + 2 * span
    left = np.clip(np.floor(np.minimum(x0, x1) - reach), -span, size).astype(np.int64)
    top = np.clip(np.floor(np.minimum(y0, y1) - reach), -span, size).astype(np.int64)
    offsets = np.arange(span)
    columns = left[:, None] + offsets  # [N, W]
    rows = top[:, None] + offsets  # [N, H]
    from_x = (columns.astype(f32) + f32(0.5) - x0[:, None])[:, None, :]  # [N, 1, W]
    from_y = (rows.astype(f32) + f32(0.5) - y0[:, None])[:, :, None]  # [N, H, 1]
    dx, dy = dx[:, None, None], dy[:, None, None]
    # A jittered dot can have zero length; the floor keeps the projection finite (t = 0).
    inverse_length2 = f32(1) / np.maximum(dx * dx + dy * dy, f32(1e-6))
    # Position of the nearest point along the segment, 0 at (x0, y0) and 1 at (x1, y1).
    along = from_x * (dx * inverse_length2) + from_y * (dy * inverse_length2)  # [N, H, W]
    np.maximum(along, f32(0), out=along)
    np.minimum(along, f32(1), out=along)
    # In-place arithmetic from here on: these arrays are the whole cost of a build.
    off_x = along * dx
    np.subtract(from_x, off_x, out=off_x)
    np.multiply(off_x, off_x, out=off_x)
    off_y = np.multiply(along, dy, out=along)
    np.subtract(from_y, off_y, out=off_y)
    np.multiply(off_y, off_y, out=off_y)
    coverage = np.add(off_x, off_y, out=off_x)
    np.sqrt(coverage, out=coverage)
    np.subtract(reach[:, None, None], coverage, out=coverage)
    np.maximum(coverage, f32(0), out=coverage)
    np.minimum(coverage, f32(1), out=coverage)
    np.multiply(coverage, f32(255), out=coverage)
    ink = np.rint(coverage, out=coverage).astype(np.uint8)
    owner = np.repeat(np.arange(instances), per_instance)
    flat = ((owner * side)[:, None, None] + (rows + span)[:, :, None]) * side + (columns + span)[:, None, :]
    canvas = np.zeros(instances * side * side, dtype=np.uint8)
    np.maximum.at(canvas, flat.reshape(-1), ink.reshape(-1))  # 1-D: numpy's fast path for ufunc.at
    return canvas.reshape(instances, side, side)[:, span : span + size, span : span + size].copy()
