"""The method registry is derived from the classes: keys equal names, every method is exported."""

import passes.registry
import surgeon
from surgeon.spec import MethodSpec


def test_every_registry_key_is_its_class_name():
    assert passes.registry.METHODS
    for key, cls in passes.registry.METHODS.items():
        assert key == cls.name
        assert issubclass(cls, MethodSpec)


def test_every_method_is_exported_under_its_class_name():
    for cls in passes.registry.METHODS.values():
        assert getattr(surgeon, cls.__name__) is cls


def test_design_methods_are_registered():
    expected = {"lora", "dora", "adalora", "vera", "lokr", "loha", "ia3"}
    assert expected <= set(passes.registry.METHODS)
