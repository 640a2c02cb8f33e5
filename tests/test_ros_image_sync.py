"""ImageSync pairs the cameras' images of one moment whatever order they arrive in."""

import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import Image

from vla_stack.errors import VlaStackError
from vla_stack.ros.common import ImageSync, seconds


def image(t: float) -> Image:
    msg = Image()
    msg.header.stamp = Time(sec=int(t), nanosec=round((t % 1) * 1e9))
    return msg


def stamps(matched: dict | None) -> dict | None:
    return None if matched is None else {c: round(seconds(m.header.stamp), 3) for c, m in matched.items()}


def test_pairs_images_of_one_moment_when_they_arrive_out_of_order():
    sync = ImageSync(["front", "wrist"], slop=0.02)
    assert sync.add("front", image(0.0)) is None
    assert stamps(sync.add("wrist", image(0.0))) == {"front": 0.0, "wrist": 0.0}
    # the next front frame overtakes the wrist frame of 0.1: no set of 0.1 front + 0.0 wrist
    assert sync.add("front", image(0.1)) is None
    assert sync.add("front", image(0.2)) is None
    assert stamps(sync.add("wrist", image(0.1))) == {"wrist": 0.1, "front": 0.1}
    assert stamps(sync.add("wrist", image(0.2))) == {"wrist": 0.2, "front": 0.2}


def test_never_hands_out_a_set_twice_or_an_older_one():
    sync = ImageSync(["front", "wrist"], slop=0.02)
    sync.add("front", image(1.0))
    assert sync.add("wrist", image(1.0)) is not None
    assert sync.add("wrist", image(1.0)) is None  # a duplicate delivery
    assert sync.add("wrist", image(0.9)) is None  # a late frame of an older moment


def test_free_running_cameras_match_within_the_slop_only():
    sync = ImageSync(["front", "wrist"], slop=0.02)
    sync.add("front", image(2.000))
    assert stamps(sync.add("wrist", image(2.015))) == {"wrist": 2.015, "front": 2.0}
    sync.add("front", image(2.100))
    assert sync.add("wrist", image(2.150)) is None  # 50 ms apart: not one observation


def test_one_camera_needs_no_partner_and_a_negative_slop_is_refused():
    sync = ImageSync(["front"], slop=0.0)
    assert stamps(sync.add("front", image(3.0))) == {"front": 3.0}
    with pytest.raises(VlaStackError, match="slop"):
        ImageSync(["front"], slop=-1.0)
