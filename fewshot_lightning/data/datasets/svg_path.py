"""SVG path data (the ``d`` attribute) as cubic Bézier curves, and their flattening to polylines.

Implements the path grammar of SVG 1.1, section 8.3 (https://www.w3.org/TR/SVG11/paths.html)
for the commands that draw lines and cubic curves: moveto (M/m), lineto (L/l, H/h, V/v),
cubic (C/c), smooth cubic (S/s) and closepath (Z/z), absolute (upper case) or relative to
the current point (lower case), with a command letter's arguments repeated implicitly and
numbers separated by spaces, commas, a sign, or a second decimal point ("1.5.5" is 1.5, 0.5).
Quadratic (Q/T) and elliptical-arc (A) commands are refused with an error naming them: the
KanjiVG files this serves use only M/m, C/c and S/s.

Every coordinate is a Python ``float`` of the decimal text (correctly rounded) and every
derived point comes from +, -, * and / alone, so the numbers are the same on every machine.
"""
from __future__ import annotations

import re
from typing import List

import numpy as np

# A command letter, or a number: optional sign, digits with an optional fraction (or a
# fraction alone), optional exponent. Separators are what the pattern skips.
_TOKEN = re.compile(r"([MmLlHhVvCcSsZz])|([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)|([,\s]+)|(.)")
_ARGUMENTS = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Z": 0}


def _tokens(d: str) -> List[object]:
    tokens: List[object] = []
    for match in _TOKEN.finditer(d):
        command, number, _, other = match.groups()
        if command is not None:
            tokens.append(command)
        elif number is not None:
            tokens.append(float(number))
        elif other is not None:
            raise ValueError(
                f"SVG path {d!r}: unsupported character {other!r} at offset {match.start()} (commands understood: "
                "M L H V C S Z, absolute or relative; quadratic Q/T and arc A are not implemented)."
            )
    return tokens


def _line(x0: float, y0: float, x1: float, y1: float) -> List[float]:
    """A straight segment as a cubic: control points at a third and two thirds of the way."""
    return [x0, y0, x0 + (x1 - x0) / 3, y0 + (y1 - y0) / 3, x1 - (x1 - x0) / 3, y1 - (y1 - y0) / 3, x1, y1]


def parse_path(d: str) -> List[np.ndarray]:
    """The subpaths of SVG path data ``d``, each a ``[n, 4, 2]`` float64 array of ``n`` cubic
    Bézier segments (start, two control points, end; lines are cubics along the line).

    A subpath that is only a moveto has no segments and is left out. Raises ``ValueError``
    naming the path and the problem for anything outside the grammar described in the module
    docstring.
    """
    tokens = _tokens(d)
    subpaths: List[np.ndarray] = []
    segments: List[List[float]] = []
    x = y = start_x = start_y = 0.0
    # Second control point of the previous cubic, for the reflection of S/s; None after any other command.
    previous_control = None
    position, command = 0, None

    def finish_subpath() -> None:
        if segments:
            subpaths.append(np.asarray(segments, dtype=np.float64).reshape(-1, 4, 2))
        segments.clear()

    while position < len(tokens):
        token = tokens[position]
        if isinstance(token, str):
            command = token
            position += 1
        elif command is None:
            raise ValueError(f"SVG path {d!r} starts with a number; it must start with a moveto (M or m).")
        elif command in "Zz":
            raise ValueError(f"SVG path {d!r}: a number follows closepath (Z), which takes none.")
        upper = command.upper()
        count = _ARGUMENTS[upper]
        arguments = tokens[position : position + count]
        if len(arguments) < count or any(isinstance(a, str) for a in arguments):
            raise ValueError(f"SVG path {d!r}: command {command} needs {count} numbers, got {arguments}.")
        position += count
        relative = command.islower()
        # A leading m is absolute (SVG 1.1, 8.3.2); relative to the initial (0, 0) it is the same.
        dx, dy = (x, y) if relative else (0.0, 0.0)

        if upper == "M":
            finish_subpath()
            x, y = dx + arguments[0], dy + arguments[1]
            start_x, start_y = x, y
            previous_control = None
            # Further pairs after a moveto are implicit linetos (SVG 1.1, 8.3.2).
            command = "l" if relative else "L"
            continue
        if upper == "Z":
            if (x, y) != (start_x, start_y):
                segments.append(_line(x, y, start_x, start_y))
            x, y = start_x, start_y
            previous_control = None
            continue
        if upper in "LHV":
            if upper == "L":
                end_x, end_y = dx + arguments[0], dy + arguments[1]
            elif upper == "H":
                end_x, end_y = dx + arguments[0], y
            else:
                end_x, end_y = x, dy + arguments[0]
            segments.append(_line(x, y, end_x, end_y))
            x, y = end_x, end_y
            previous_control = None
            continue
        if upper == "C":
            c1x, c1y = dx + arguments[0], dy + arguments[1]
            c2x, c2y = dx + arguments[2], dy + arguments[3]
            end_x, end_y = dx + arguments[4], dy + arguments[5]
        else:  # S: the first control point mirrors the previous cubic's second about the current point
            c1x, c1y = (x, y) if previous_control is None else (2 * x - previous_control[0], 2 * y - previous_control[1])
            c2x, c2y = dx + arguments[0], dy + arguments[1]
            end_x, end_y = dx + arguments[2], dy + arguments[3]
        segments.append([x, y, c1x, c1y, c2x, c2y, end_x, end_y])
        x, y = end_x, end_y
        previous_control = (c2x, c2y)
    finish_subpath()
    return subpaths


def control_polygon_lengths(cubics: np.ndarray) -> np.ndarray:
    """Length of each cubic's control polygon (``[n, 4, 2]`` -> ``[n]``): an upper bound on its arc length."""
    legs = cubics[:, 1:] - cubics[:, :-1]
    lengths = np.sqrt(legs[..., 0] * legs[..., 0] + legs[..., 1] * legs[..., 1])
    return lengths[:, 0] + lengths[:, 1] + lengths[:, 2]


def flatten(cubics: np.ndarray, pieces: np.ndarray) -> np.ndarray:
    """Points of a chain of cubics (``[n, 4, 2]``, each starting where the last ended) at
    ``pieces[j]`` equal steps of the parameter of cubic ``j``: ``[1 + sum(pieces), 2]``.

    The Bernstein form is written out term by term (no matrix product, whose summation order
    could vary between BLAS builds), so the points are exact-rounding arithmetic.
    """
    pieces = np.asarray(pieces, dtype=np.int64)
    if pieces.shape != (len(cubics),) or (pieces < 1).any():
        raise ValueError(f"pieces must hold one count of at least 1 per cubic ({len(cubics)}), got {pieces}.")
    owner = np.repeat(np.arange(len(cubics)), pieces)
    first = np.cumsum(pieces) - pieces
    # t runs over 1/n, 2/n, ..., 1 in each cubic; the chain's first point is added at the front.
    t = ((np.arange(len(owner)) - first[owner] + 1) / pieces[owner])[:, None]
    s = 1 - t
    p0, p1, p2, p3 = (cubics[owner, k] for k in range(4))
    points = s * s * s * p0 + 3 * s * s * t * p1 + 3 * s * t * t * p2 + t * t * t * p3
    return np.concatenate([cubics[:1, 0], points])
