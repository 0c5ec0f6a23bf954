"""FixedPolicy / AdaptivePolicy: precision by measured latency at the load (fake clock)."""

from absl.testing import absltest

from anyprec_jax.serving.policy import AdaptivePolicy, FixedPolicy


class FakeClock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class PolicyTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.clock = FakeClock()
    self.policy = AdaptivePolicy((8, 3, 4), target_ms=20, max_batch=8, stale_s=30,
                                 clock=self.clock)

  def test_fixed_is_fixed(self):
    policy = FixedPolicy(6)
    policy.record(6, 8, 1e9)
    self.assertEqual([policy.choose(n) for n in (1, 8, 100)], [6, 6, 6])

  def test_unmeasured_precisions_are_tried_highest_first(self):
    self.assertEqual(self.policy.choose(1), 8)
    self.policy.record(8, 1, 25)
    self.assertEqual(self.policy.choose(1), 4)
    self.policy.record(4, 1, 21)
    self.policy.record(3, 1, 30)
    self.assertEqual(self.policy.choose(1), 3)  # Nothing meets the target: the lowest.
    self.assertEqual(self.policy.last_choice, 3)

  def test_load_maps_to_batch_buckets(self):
    self.policy.record(8, 3, 50)  # A batch of 3 rows runs in the bucket of 4.
    self.assertEqual(self.policy.estimate(8, 4), 50)
    self.assertEqual(self.policy.estimate(8, 3), 50)
    self.assertIsNone(self.policy.estimate(8, 2))
    self.assertEqual(self.policy.estimate(8, 1000), None)  # Bucket 8: unmeasured.
    self.policy.record(8, 8, 70)
    self.assertEqual(self.policy.estimate(8, 1000), 70)

  def test_moving_average(self):
    self.policy.record(4, 8, 30)
    self.policy.record(4, 8, 10)  # alpha 0.5
    self.assertEqual(self.policy.estimate(4, 8), 20)
    self.assertEqual(self.policy.estimates(), {(4, 8): 20})

  def test_drops_as_load_rises_and_recovers_as_it_falls(self):
    """A simulated server: latency = bits * batch ms; three requests per load level,
    each measured at the precision it got. Target 20 ms."""
    chosen = []
    for load in (1, 2, 4, 8, 4, 2, 1):
      for _ in range(3):
        b = self.policy.choose(load)
        self.policy.record(b, load, float(b * load))
        self.clock.now += 1
      chosen.append(b)
    # 8 bits meets 20 ms up to a batch of 2; at 4 only 4 bits does (16 ms); at 8 none
    # does (3 * 8 = 24), so the lowest; falling load finds the measured ones again.
    self.assertEqual(chosen, [8, 8, 4, 3, 4, 8, 8])

  def test_stale_measurements_are_forgotten(self):
    self.policy.record(8, 8, 100)
    self.policy.record(4, 8, 10)
    self.assertEqual(self.policy.choose(8), 4)
    self.clock.now = 31.0
    self.assertEqual(self.policy.estimates(), {})
    self.assertEqual(self.policy.choose(8), 8)  # Tried again: slowness may have passed.
    self.policy.record(8, 8, 10)  # Stale old value is replaced, not averaged in.
    self.assertEqual(self.policy.estimate(8, 8), 10)

  def test_bad_arguments(self):
    with self.assertRaises(ValueError):
      AdaptivePolicy((3, 8), target_ms=0, max_batch=8)


if __name__ == "__main__":
  absltest.main()
