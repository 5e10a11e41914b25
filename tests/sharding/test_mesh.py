"""make_mesh: axis names, the -1 wildcard, axis types, errors (8 devices)."""

import jax
from jax.sharding import AxisType
import pytest

from moejax.sharding import make_mesh
from moejax.sharding import mesh as mesh_lib


def test_dict_with_wildcard():
  mesh = make_mesh({"data": -1, "expert": 4})
  assert mesh.axis_names == ("data", "expert")
  assert dict(mesh.shape) == {"data": 2, "expert": 4}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_sequence_keeps_order_and_all_axes():
  mesh = make_mesh([("tensor", 2), ("data", 1), ("fsdp", 2), ("expert", 2)])
  assert mesh.axis_names == ("tensor", "data", "fsdp", "expert")
  assert mesh.devices.size == 8


def test_axis_types_explicit_and_per_axis():
  mesh = make_mesh({"data": 2, "expert": 4}, axis_types="explicit")
  assert mesh.axis_types == (AxisType.Explicit,) * 2
  mesh = make_mesh({"data": 2, "expert": 4},
                   axis_types={"expert": AxisType.Explicit})
  assert mesh.axis_types == (AxisType.Auto, AxisType.Explicit)


def test_given_devices_in_order():
  devices = jax.devices()[::-1]
  mesh = make_mesh({"data": 2, "expert": 4}, devices=devices)
  assert list(mesh.devices.flat) == devices


@pytest.mark.parametrize("sizes, match", [
    ({"data": 3}, "multiply to 3 devices but there are 8"),
    ({"data": 2, "expert": 2}, "multiply to 4 devices"),
    ({"batch": 8}, "unknown mesh axis 'batch'"),
    ({"data": -1, "expert": -1}, "only one mesh axis may be -1"),
    ({"data": 0, "expert": -1}, "size must be an integer >= 1"),
    ({"data": 3, "expert": -1}, "does not divide the 8 devices"),
    ({"data": 2.0, "expert": 4}, "size must be an integer"),
    ([("data", 2), ("data", 4)], "given twice"),
    ({}, "axis_sizes is empty"),
])
def test_errors(sizes, match):
  with pytest.raises(ValueError, match=match):
    make_mesh(sizes)


def test_axis_type_errors():
  with pytest.raises(ValueError, match="unknown axis type"):
    make_mesh({"data": 8}, axis_types="manualish")
  with pytest.raises(ValueError, match="Manual"):
    make_mesh({"data": 8}, axis_types=AxisType.Manual)
  with pytest.raises(ValueError, match="not in the mesh"):
    make_mesh({"data": 8}, axis_types={"expert": "auto"})


def test_axis_size_helper():
  mesh = make_mesh({"data": 2, "expert": 4})
  assert mesh_lib.axis_size(mesh, "expert") == 4
  assert mesh_lib.axis_size(mesh, "tensor") == 1
