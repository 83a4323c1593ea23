"""The advice of a gang that could not be placed fits the cluster it could not be placed on."""

from shardwright.actors.gang import placement_advice


def test_no_gpus_at_all_says_how_to_declare_logical_ones():
    text = placement_advice(needed=2, free=0, total=0)
    assert "--num-gpus" in text and "lower tp*pp" not in text


def test_a_cluster_too_small_says_add_gpus_or_lower_the_layout():
    text = placement_advice(needed=8, free=4, total=4)
    assert "lower tp*pp" in text and "needs 8" in text


def test_a_busy_cluster_says_wait_or_stop_jobs():
    text = placement_advice(needed=2, free=1, total=4)
    assert "wait" in text and "lower tp*pp" not in text and "1 free of 4" in text
