"""libvirt XML for vhost-user disks, checked by libvirt itself.

Two real peers: ``virt-xml-validate`` (libvirt's RelaxNG schema, through xmllint) and libvirt's
own domain parser and validator, reached through ``virsh`` on the in-process test driver
(``test:///default``), which runs the same checks as the QEMU driver's define.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from storvisor.errors import InvalidArgument
from storvisor.integrations.libvirt import (
    VhostUserDisk,
    domain_xml,
    vhost_user_disk_xml,
)

DISKS = [
    VhostUserDisk("/run/storvisor/vhost/p-v1.sock", target_dev="vda", queues=2),
    VhostUserDisk(
        "/run/storvisor/vhost/p-v2.sock",
        target_dev="vdb",
        serial="sv-0002",
        read_only=True,
        reconnect_timeout=3,
    ),
]


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "domain.xml"
    path.write_text(text)
    return subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )


def virsh_define(tmp_path: Path, text: str, name: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "define.xml"
    path.write_text(text)
    return subprocess.run(
        ["virsh", "-q", "-c", "test:///default", f"define {path}; dumpxml {name}"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_schema_files_are_installed() -> None:
    assert Path("/usr/share/libvirt/schemas/domain.rng").is_file()


def test_full_domain_validates_against_libvirt_schema(tmp_path: Path) -> None:
    result = validate(tmp_path, domain_xml("guest1", DISKS, memory_mib=2048, vcpus=2))
    assert result.returncode == 0, result.stderr
    assert "validates" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('<source type="unix" path="/run/', '<source type="unix" path="run/'),  # relative
        ('type="unix"', 'type="tcp"'),
        ('<reconnect enabled="yes"', '<reconnect enabled="maybe"'),
        ('<access mode="shared"/>', '<access mode="public"/>'),
        ('bus="virtio"/>', 'bus="virtio"/><bogus/>'),
    ],
)
def test_broken_document_fails_validation(tmp_path: Path, old: str, new: str) -> None:
    text = domain_xml("guest1", DISKS)
    assert old in text
    result = validate(tmp_path, text.replace(old, new, 1))
    assert result.returncode != 0
    assert "fails to validate" in result.stderr


def test_libvirt_defines_the_domain_and_keeps_every_setting(tmp_path: Path) -> None:
    result = virsh_define(tmp_path, domain_xml("guest1", DISKS, domain_type="test"), "guest1")
    assert result.returncode == 0, result.stderr
    dumped = ET.fromstring(result.stdout)
    backing = dumped.find("memoryBacking")
    assert backing is not None
    assert backing.find("source").get("type") == "memfd"  # type: ignore[union-attr]
    assert backing.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    disks = dumped.findall("devices/disk")
    assert [d.get("type") for d in disks] == ["vhostuser", "vhostuser"]
    first, second = disks
    assert first.find("driver").attrib == {"name": "qemu", "type": "raw", "queues": "2"}  # type: ignore[union-attr]
    source = second.find("source")
    assert source is not None
    assert source.attrib == {"type": "unix", "path": "/run/storvisor/vhost/p-v2.sock"}
    assert source.find("reconnect").attrib == {"enabled": "yes", "timeout": "3"}  # type: ignore[union-attr]
    assert second.find("target").attrib == {"dev": "vdb", "bus": "virtio"}  # type: ignore[union-attr]


@pytest.mark.parametrize("element", ["<serial>sv-0002</serial>", "<readonly/>"])
def test_libvirt_refuses_serial_and_readonly_on_vhostuser_disks(
    tmp_path: Path, element: str
) -> None:
    """Why the serial and read-only flag come from the export, not from the XML."""
    text = domain_xml("guest1", DISKS[:1], domain_type="test")
    text = text.replace(
        '<target dev="vda" bus="virtio"/>', f'<target dev="vda" bus="virtio"/>{element}'
    )
    result = virsh_define(tmp_path, text, "guest1")
    assert result.returncode != 0
    assert "not supported with vhostuser disk" in result.stderr


def test_cli_text_holds_disk_and_memory_backing() -> None:
    text = vhost_user_disk_xml("/tmp/sv.sock", "sv-77", 4, "vdc", True)
    disk_text, backing_text = text.split("<memoryBacking>")
    disk = ET.fromstring(disk_text)
    backing = ET.fromstring("<memoryBacking>" + backing_text)
    assert disk.tag == "disk"
    assert disk.attrib == {"type": "vhostuser", "device": "disk"}
    assert disk.find("driver").get("queues") == "4"  # type: ignore[union-attr]
    assert disk.find("target").get("dev") == "vdc"  # type: ignore[union-attr]
    assert disk.find("serial") is None and disk.find("readonly") is None
    assert "serial sv-77" in disk_text and "read-only" in disk_text
    assert [child.tag for child in backing] == ["source", "access"]


def test_cli_text_pasted_into_a_domain_validates(tmp_path: Path) -> None:
    disk_text, backing_text = vhost_user_disk_xml("/tmp/sv.sock", "", 1, "vda", False).split(
        "<memoryBacking>"
    )
    document = (
        "<domain type='kvm'><name>pasted</name><memory unit='MiB'>512</memory>"
        f"<memoryBacking>{backing_text}<os><type arch='x86_64'>hvm</type></os>"
        f"<devices>{disk_text}</devices></domain>"
    )
    result = validate(tmp_path, document)
    assert result.returncode == 0, result.stderr


def test_special_characters_in_socket_path_are_escaped(tmp_path: Path) -> None:
    path = "/tmp/a dir/<sock>&'\".sock"
    text = domain_xml("g", [VhostUserDisk(path)], domain_type="test")
    source = ET.fromstring(text).find("devices/disk/source")
    assert source is not None and source.get("path") == path


@pytest.mark.parametrize(
    "kwargs",
    [
        {"socket_path": "relative.sock"},
        {"socket_path": "/tmp/x.sock", "target_dev": "sda"},
        {"socket_path": "/tmp/x.sock", "target_dev": "vd1"},
        {"socket_path": "/tmp/x.sock", "queues": 0},
        {"socket_path": "/tmp/x.sock", "queues": 2000},
        {"socket_path": "/tmp/x.sock", "reconnect_timeout": 0},
        {"socket_path": "/tmp/x.sock", "serial": "a--b"},
        {"socket_path": "/tmp/x.sock", "serial": "line\nbreak"},
    ],
)
def test_bad_description_is_invalid_argument(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        VhostUserDisk(**kwargs)  # type: ignore[arg-type]


def test_duplicate_targets_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="duplicate"):
        domain_xml("g", [VhostUserDisk("/tmp/a.sock"), VhostUserDisk("/tmp/b.sock")])
