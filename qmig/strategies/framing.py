"""Stream framing: the header, CONFIGURATION, section headers and footers, VMDESCRIPTION."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from qmig.strategies.basics import _profile, names, uints
from qmig.wire import messages as m


def stream_headers(version: str | None = None) -> st.SearchStrategy[m.StreamHeader]:
    return st.just(m.StreamHeader(_profile(version).stream_version))


def machine_types() -> st.SearchStrategy[str]:
    return names(1, 40)


def configurations(
    version: str | None = None, *, any_page_bits: bool = False
) -> st.SearchStrategy[m.Configuration]:
    """CONFIGURATION with the subsections ``version`` knows.

    The target page bits are the profile's unless ``any_page_bits`` (qmig's reader refuses
    other values; the schema builds any).
    """
    profile = _profile(version)
    subsections = profile.configuration_subsections
    page_bits = uints(32) if any_page_bits else st.just(profile.default_target_page_bits)
    capabilities: st.SearchStrategy[tuple[str, ...] | None] = st.none()
    if "capabilities" in subsections:
        capabilities = st.none() | st.lists(
            st.sampled_from(profile.validated_capabilities), unique=True, min_size=1
        ).map(tuple)
    uuids: st.SearchStrategy[bytes | None] = st.none()
    if "uuid" in subsections:
        uuids = st.none() | st.binary(min_size=16, max_size=16)
    return st.builds(
        m.Configuration,
        machine_type=machine_types(),
        target_page_bits=st.none() | page_bits,
        capabilities=capabilities,
        uuid=uuids,
    )


def section_starts(idstrs: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    return st.builds(m.SectionStart, uints(32), idstrs or names(), uints(32), uints(32))


def section_fulls(idstrs: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    return st.builds(m.SectionFull, uints(32), idstrs or names(), uints(32), uints(32))


def section_parts() -> st.SearchStrategy[m.SectionPart]:
    return st.builds(m.SectionPart, uints(32))


def section_ends() -> st.SearchStrategy[m.SectionEnd]:
    return st.builds(m.SectionEnd, uints(32))


def section_headers() -> st.SearchStrategy[Any]:
    return st.one_of(section_starts(), section_fulls(), section_parts(), section_ends())


def section_footers() -> st.SearchStrategy[m.SectionFooter]:
    return st.builds(m.SectionFooter, uints(32))


def vm_descriptions(max_size: int = 256) -> st.SearchStrategy[m.VmDescription]:
    return st.builds(m.VmDescription, st.binary(max_size=max_size))
