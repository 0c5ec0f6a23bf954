"""TextStream: incremental text, stop strings held back and cut, partial characters."""

from absl.testing import absltest

from anyprec_jax.serving.text import TextStream


class ByteTokenizer:
  """Test fake: token t is byte t (decoded as UTF-8, partial sequences as U+FFFD)."""

  def decode(self, ids, skip_special_tokens=True):
    del skip_special_tokens
    return bytes(ids).decode("utf-8", errors="replace")


def push_all(stream, text: bytes):
  return [stream.push(t) for t in text]


class TextStreamTest(absltest.TestCase):

  def test_plain_text_streams_token_by_token(self):
    s = TextStream(ByteTokenizer())
    self.assertEqual(push_all(s, b"abc"), ["a", "b", "c"])
    self.assertEqual(s.flush(), "")
    self.assertFalse(s.stopped)

  def test_stop_string_across_tokens_is_cut(self):
    s = TextStream(ByteTokenizer(), stop=["END"])
    deltas = push_all(s, b"xyEN")
    self.assertEqual("".join(deltas), "xy")  # "EN" may start "END": held back.
    self.assertFalse(s.stopped)
    self.assertEqual(s.push(ord("D")), "")
    self.assertTrue(s.stopped)
    self.assertEqual(s.text, "xy")

  def test_held_text_is_released_when_it_cannot_be_a_stop(self):
    s = TextStream(ByteTokenizer(), stop=["END", "!!"])
    self.assertEqual(push_all(s, b"E!"), ["", "E"])  # "!" may start "!!".
    self.assertEqual(s.push(ord("x")), "!x")
    self.assertEqual(s.push(ord("E")), "")
    self.assertEqual(s.flush(), "E")  # The row ended without the stop string.

  def test_earliest_stop_wins(self):
    s = TextStream(ByteTokenizer(), stop=["c", "ab"])
    self.assertEqual("".join(push_all(s, b"zabc")), "z")
    self.assertTrue(s.stopped)

  def test_partial_utf8_is_held_until_complete(self):
    s = TextStream(ByteTokenizer())
    euro = "€".encode()  # 3 bytes
    self.assertEqual(push_all(s, euro), ["", "", "€"])


if __name__ == "__main__":
  absltest.main()
