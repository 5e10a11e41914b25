"""TensorBoard event files without TensorFlow, TensorBoard or protobuf.

An event file (`events.out.tfevents.*`) is a sequence of records:

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes)
    | data[length] | uint32 masked_crc32c(data)

where `masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32)`
of the CRC-32C (Castagnoli) checksum, and each `data` is a serialised
`tensorboard.Event` protocol buffer. This module writes and reads the few
fields scalars need, encoding the protobuf wire format by hand:

    Event:          1 wall_time (double), 2 step (int64), 3 file_version
                    (string), 5 summary (Summary), 7 session_log (SessionLog)
    Summary:        1 value (repeated Summary.Value)
    Summary.Value:  1 tag (string), 2 simple_value (float)
    SessionLog:     1 status (enum; START = 1)

TensorBoard reads `simple_value` scalars as its Scalars plugin data. A
SessionLog START event at step s makes TensorBoard drop the events of an
earlier run of the same directory with step >= s (used on resume).
"""

import os
import socket
import struct
import time

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)
del _i, _c

_MASK_DELTA = 0xA282EAD8
FILE_VERSION = "brain.Event:2"
SESSION_LOG_START = 1


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`; crc32c(b'123456789') == 0xE3069283."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ------------------------------------------------------------ wire format


def _varint(value: int) -> bytes:
  if value < 0:
    value += 1 << 64  # int64 negatives: ten-byte two's complement
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _len_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def encode_scalar_value(tag: str, value: float) -> bytes:
  """A serialised Summary.Value {tag, simple_value}."""
  return (_len_delimited(1, tag.encode("utf-8")) + _key(2, 5) +
          struct.pack("<f", float(value)))


def encode_event(*, wall_time: float, step: int = 0, file_version=None,
                 scalars=None, session_log_status=None) -> bytes:
  """A serialised Event with the given fields (scalars: {tag: float})."""
  out = bytearray(_key(1, 1) + struct.pack("<d", wall_time))
  if step:
    out += _key(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _len_delimited(3, file_version.encode("utf-8"))
  if scalars:
    summary = b"".join(_len_delimited(1, encode_scalar_value(t, v))
                       for t, v in scalars.items())
    out += _len_delimited(5, summary)
  if session_log_status is not None:
    out += _len_delimited(7, _key(1, 0) + _varint(session_log_status))
  return bytes(out)


def _read_varint(buf: bytes, pos: int):
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes):
  """Yields (field number, wire type, value) of a serialised message."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, pos = _read_varint(buf, pos)
    elif wire_type == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire_type == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire_type == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire_type}")
    yield field, wire_type, value


def decode_event(data: bytes) -> dict:
  """The fields this module writes, from a serialised Event.

  Returns dict(wall_time, step, file_version (or None), scalars {tag: float},
  session_log_status (or None)). Unknown fields are skipped.
  """
  event = dict(wall_time=0.0, step=0, file_version=None, scalars={},
               session_log_status=None)
  for field, wire_type, value in _fields(data):
    if field == 1 and wire_type == 1:
      event["wall_time"] = struct.unpack("<d", value)[0]
    elif field == 2 and wire_type == 0:
      event["step"] = value - (1 << 64) if value >= 1 << 63 else value
    elif field == 3 and wire_type == 2:
      event["file_version"] = value.decode("utf-8")
    elif field == 5 and wire_type == 2:
      for f, _, summary_value in _fields(value):
        if f != 1:
          continue
        tag, scalar = None, None
        for vf, vt, vv in _fields(summary_value):
          if vf == 1 and vt == 2:
            tag = vv.decode("utf-8")
          elif vf == 2 and vt == 5:
            scalar = struct.unpack("<f", vv)[0]
        if tag is not None and scalar is not None:
          event["scalars"][tag] = scalar
    elif field == 7 and wire_type == 2:
      for f, _, status in _fields(value):
        if f == 1:
          event["session_log_status"] = status
  return event


# ----------------------------------------------------------------- records


def encode_record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


def read_records(path):
  """Yields the data of each record of a TFRecord/event file.

  Raises:
    ValueError: a checksum mismatch (corrupt file). A truncated last record
      (a writer killed mid-write) ends the iteration quietly, as TensorBoard
      does.
  """
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      length, length_crc = struct.unpack("<QI", header)
      if masked_crc32c(header[:8]) != length_crc:
        raise ValueError(f"{path}: corrupt record length at byte "
                         f"{f.tell() - 12}")
      data = f.read(length)
      footer = f.read(4)
      if len(data) < length or len(footer) < 4:
        return
      if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
        raise ValueError(f"{path}: corrupt record data at byte "
                         f"{f.tell() - 4 - length}")
      yield data


def read_events(path):
  """The decoded events of one event file (see decode_event), in order."""
  return [decode_event(d) for d in read_records(path)]


def read_scalars(path_or_dir):
  """{tag: [(step, value), ...]} from an event file or every event file of
  a directory (sorted by name, i.e. by creation time)."""
  if os.path.isdir(path_or_dir):
    paths = sorted(os.path.join(path_or_dir, n)
                   for n in os.listdir(path_or_dir) if "tfevents" in n)
  else:
    paths = [path_or_dir]
  out = {}
  for path in paths:
    for event in read_events(path):
      for tag, value in event["scalars"].items():
        out.setdefault(tag, []).append((event["step"], value))
  return out


class EventFileWriter:
  """Appends scalar summaries to a new event file in `logdir`.

  Example:
    w = EventFileWriter('/tmp/run/tb')
    w.write_scalars(10, {'train/loss': 2.5})
    w.flush(); w.close()

  Each instance creates its own file
  (`events.out.tfevents.<time>.<host>.<pid>.<n>`), so a resumed run never
  appends to a file another process may still hold.
  """

  _count = 0

  def __init__(self, logdir, *, flush_every_secs=10.0):
    os.makedirs(logdir, exist_ok=True)
    EventFileWriter._count += 1
    name = (f"events.out.tfevents.{int(time.time()):010d}."
            f"{socket.gethostname()}.{os.getpid()}.{EventFileWriter._count}")
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "wb")
    self._flush_every = flush_every_secs
    self._last_flush = time.monotonic()
    self._write(encode_event(wall_time=time.time(),
                             file_version=FILE_VERSION))
    self.flush()

  def _write(self, data):
    self._file.write(encode_record(data))
    if time.monotonic() - self._last_flush > self._flush_every:
      self.flush()

  def write_scalars(self, step, scalars, wall_time=None):
    """One Event with a Summary of {tag: float} at `step`."""
    if scalars:
      self._write(encode_event(
          wall_time=time.time() if wall_time is None else wall_time,
          step=step, scalars={k: float(v) for k, v in scalars.items()}))

  def write_session_start(self, step):
    """SessionLog START at `step`: TensorBoard then drops older events of
    this directory with step >= `step` (the steps a resumed run redoes)."""
    self._write(encode_event(wall_time=time.time(), step=step,
                             session_log_status=SESSION_LOG_START))

  def flush(self):
    self._file.flush()
    self._last_flush = time.monotonic()

  def close(self):
    if not self._file.closed:
      self._file.flush()
      self._file.close()
