"""libvirt XML for SCSI attachments (a LUN disk on a virtio-scsi controller, a vhost-scsi
hostdev), planned against real domain definitions and checked by libvirt itself.

Every plan is applied to its domain and the result must pass ``virt-xml-validate`` (libvirt's
RelaxNG schema) and ``virsh -c test:///default define`` (libvirt's parser and domain
validator: duplicate drive addresses, duplicate boot orders, per-device boot beside
``<os><boot>``); the defined domain's ``dumpxml`` must then hold the device where the plan put
it. The builder takes the LUN's device path and the WWPN as inputs, so no SCSI export is
needed here.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.cli_harness import CLI
from prereq import require
from storvisor.errors import InvalidArgument
from storvisor.integrations.libvirt import scsi
from storvisor.integrations.libvirt.scsi import DomainDevices, DriveAddress, ScsiMode

LUN = "/dev/disk/by-id/wwn-0x6001405abcdef0123"
WWPN = "naa.5001405123456789"


def domain(devices: str = "", os_boot: str = "", name: str = "scsi-test") -> str:
    return (
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type>{os_boot}</os>"
        f"<devices>{devices}</devices></domain>"
    )


def scsi_disk(dev: str, address: tuple[int, int] | None = None, boot: int | None = None) -> str:
    where = ""
    if address is not None:
        where = (
            f"<address type='drive' controller='{address[0]}' bus='0' target='0' "
            f"unit='{address[1]}'/>"
        )
    order = f"<boot order='{boot}'/>" if boot is not None else ""
    return (
        f"<disk type='file' device='disk'><source file='/var/lib/images/{dev}.img'/>"
        f"<target dev='{dev}' bus='scsi'/>{order}{where}</disk>"
    )


def virtio_disk(dev: str, boot: int | None = None) -> str:
    order = f"<boot order='{boot}'/>" if boot is not None else ""
    return (
        f"<disk type='file' device='disk'><source file='/var/lib/images/{dev}.img'/>"
        f"<target dev='{dev}' bus='virtio'/>{order}</disk>"
    )


def controller(index: int | None, model: str | None) -> str:
    attributes = "" if index is None else f" index='{index}'"
    attributes += "" if model is None else f" model='{model}'"
    return f"<controller type='scsi'{attributes}/>"


NIC = (
    "<interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/>"
    "<boot order='{order}'/></interface>"
)


@dataclass(frozen=True)
class Case:
    """A domain and where the LUN must go in it: the new controller's index (``None``: an
    existing virtio-scsi controller is used), the address and the target name."""

    devices: str
    new_controller: int | None
    address: DriveAddress
    target_dev: str
    os_boot: str = ""


CASES = {
    "empty": Case("", 0, DriveAddress(0, 0, 0, 0), "sda"),
    # the default controller is lsilogic: never used, the new one takes the next index
    "lsilogic at 0": Case(
        controller(0, "lsilogic") + scsi_disk("sda", (0, 0)), 1, DriveAddress(1), "sdb"
    ),
    "default-model controller": Case(
        controller(0, None) + virtio_disk("vda"), 1, DriveAddress(1), "sda"
    ),
    "virtio-scsi with free units": Case(
        controller(0, "lsilogic")
        + controller(2, "virtio-scsi")
        + scsi_disk("sda", (2, 0))
        + scsi_disk("sdc", (2, 1))
        + scsi_disk("sdd", (2, 3)),
        None,
        DriveAddress(2, 0, 0, 2),
        "sdb",
    ),
    "full virtio-scsi controller": Case(
        controller(0, "virtio-scsi")
        + "".join(scsi_disk(f"sd{chr(97 + u)}", (0, u)) for u in range(7))
        + controller(2, "lsilogic"),
        1,
        DriveAddress(1),
        "sdh",
    ),
    "lowest virtio-scsi controller with room": Case(
        controller(3, "virtio-scsi")
        + controller(1, "virtio-scsi")
        + "".join(scsi_disk(f"sd{chr(97 + u)}", (1, u)) for u in range(7))
        + scsi_disk("sdz", (3, 0)),
        None,
        DriveAddress(3, 0, 0, 1),
        "sdh",
    ),
    # unaddressed disks take the slot libvirt derives from their name (sdh: controller 1),
    # and libvirt adds that controller itself, of the default model
    "implicit addresses and indexes": Case(
        scsi_disk("sda") + scsi_disk("sdh") + controller(None, "virtio-scsi"),
        None,
        DriveAddress(0, 0, 0, 1),
        "sdb",
    ),
    # sdo is controller 2 (libvirt fills 0-2 with lsilogic ones on define, unless declared)
    "implicit lsilogic controllers": Case(
        scsi_disk("sda") + scsi_disk("sdo"), 1, DriveAddress(1), "sdb"
    ),
    "scsi hostdev without an address": Case(
        controller(0, "virtio-scsi")
        + "<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/>"
        "<address bus='0' target='0' unit='0'/></source></hostdev>",
        None,
        DriveAddress(0, 0, 0, 1),
        "sda",
    ),
    "boot orders from 1": Case(
        virtio_disk("vda", boot=1) + virtio_disk("vdb", boot=2) + NIC.format(order=4),
        0,
        DriveAddress(0),
        "sda",
    ),
    "os boot": Case(virtio_disk("vda"), 0, DriveAddress(0), "sda", "<boot dev='hd'/>"),
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def libvirt_tools() -> None:
    require(shutil.which("virt-xml-validate"), "virt-xml-validate (libvirt-clients) is missing")
    require(shutil.which("xmllint"), "xmllint (libxml2-utils) is missing")
    require(shutil.which("virsh"), "virsh (libvirt-clients) is missing")


def define(tmp_path: Path, text: str, name: str = "scsi-test") -> ET.Element:
    """Check ``text`` with the schema and libvirt's define; the defined domain's XML."""
    path = tmp_path / "domain.xml"
    path.write_text(text)
    valid = run("virt-xml-validate", str(path), "domain")
    assert valid.returncode == 0, valid.stdout + valid.stderr
    defined = run("virsh", "-q", "-c", "test:///default", f"define {path}; dumpxml {name}")
    assert defined.returncode == 0, defined.stderr
    return ET.fromstring(defined.stdout)


def refused(tmp_path: Path, text: str) -> str:
    path = tmp_path / "refused.xml"
    path.write_text(text)
    result = run("virsh", "-q", "-c", "test:///default", f"define {path}")
    assert result.returncode != 0, f"libvirt accepted {text}"
    return result.stderr


def test_the_case_domains_are_valid_as_they_are(libvirt_tools: None, tmp_path: Path) -> None:
    for case in CASES.values():
        define(tmp_path, domain(case.devices, case.os_boot))


@pytest.mark.parametrize("boot", [False, True], ids=["no-boot", "boot"])
@pytest.mark.parametrize("name", list(CASES))
def test_lun_placed_in_the_domain_and_defined_by_libvirt(
    libvirt_tools: None, tmp_path: Path, name: str, boot: bool
) -> None:
    case = CASES[name]
    text = domain(case.devices, case.os_boot)
    attachment = scsi.plan(ScsiMode.LUN, LUN, text, boot=boot)
    assert attachment.new_controller == case.new_controller
    assert attachment.address == case.address
    assert attachment.target_dev == case.target_dev
    tags = [e.tag for e in attachment.devices]
    assert tags == (["disk"] if case.new_controller is None else ["controller", "disk"])

    dumped = define(tmp_path, scsi.apply(text, attachment))
    disks = [
        d
        for d in dumped.findall("devices/disk")
        if d.find("source").get("dev") == LUN  # type: ignore[union-attr]
    ]
    assert len(disks) == 1
    disk = disks[0]
    assert (disk.get("type"), disk.get("device"), disk.get("sgio")) == ("block", "lun", "filtered")
    assert disk.find("target").attrib == {"dev": case.target_dev, "bus": "scsi"}  # type: ignore[union-attr]
    address = disk.find("address")
    assert address is not None and address.attrib == {
        "type": "drive",
        "controller": str(case.address.controller),
        "bus": "0",
        "target": "0",
        "unit": str(case.address.unit),
    }
    models = {
        int(c.get("index", "-1")): c.get("model")
        for c in dumped.findall("devices/controller[@type='scsi']")
    }
    assert models[case.address.controller] == "virtio-scsi"
    assert disk.find("serial") is None  # the guest reads the LUN's own identifiers

    orders = {
        e.find("boot").get("order"): e  # type: ignore[union-attr]
        for e in dumped.find("devices")  # type: ignore[union-attr]
        if e.find("boot") is not None
    }
    if boot:
        assert orders["1"] is disk
        assert dumped.find("os/boot") is None
    else:
        assert disk.find("boot") is None
        if case.os_boot:
            assert dumped.find("os/boot") is not None


def test_boot_changes_move_the_run_of_orders_from_1(libvirt_tools: None, tmp_path: Path) -> None:
    text = domain(CASES["boot orders from 1"].devices)
    attachment = scsi.plan(ScsiMode.LUN, LUN, text, boot=True)
    moves = [(c.description, c.old_order, c.new_order) for c in attachment.boot_changes]
    assert moves == [("disk vda", 1, 2), ("disk vdb", 2, 3)]  # order 4 stays
    for change in attachment.boot_changes:
        assert change.element.find("boot").get("order") == str(change.new_order)  # type: ignore[union-attr]
    dumped = define(tmp_path, scsi.apply(text, attachment))
    orders = {
        (e.tag, e.get("dev") or e.get("address")): boot.get("order")
        for device in dumped.iterfind("devices/*")
        if (boot := device.find("boot")) is not None
        for e in device.iterfind("*")
        if (e.tag, device.tag) in (("target", "disk"), ("mac", "interface"))
    }
    assert orders == {
        ("target", "sda"): "1",
        ("target", "vda"): "2",
        ("target", "vdb"): "3",
        ("mac", "52:54:00:12:34:56"): "4",
    }
    # without the changes libvirt refuses the domain: they are needed, not decoration
    only_devices = scsi.ScsiAttachment(attachment.devices)
    assert "boot order '1' used for more than one device" in refused(
        tmp_path, scsi.apply(text, only_devices)
    )


def test_os_boot_must_go(libvirt_tools: None, tmp_path: Path) -> None:
    text = domain(virtio_disk("vda"), "<boot dev='hd'/><boot dev='cdrom'/>")
    attachment = scsi.plan(ScsiMode.LUN, LUN, text, boot=True)
    assert attachment.remove_os_boot == ("hd", "cdrom")
    assert attachment.boot_changes == ()
    assert "per-device boot elements cannot be used together with os/boot" in refused(
        tmp_path, scsi.apply(text, scsi.ScsiAttachment(attachment.devices))
    )
    define(tmp_path, scsi.apply(text, attachment))


@pytest.mark.parametrize("name", ["empty", "lsilogic at 0", "boot orders from 1", "os boot"])
def test_vhost_hostdev_defined_by_libvirt(libvirt_tools: None, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    text = domain(case.devices, case.os_boot)
    attachment = scsi.plan(ScsiMode.VHOST, WWPN, text)
    assert [e.tag for e in attachment.devices] == ["hostdev"]
    assert attachment.address is None and attachment.new_controller is None
    assert attachment.boot_changes == () and attachment.remove_os_boot == ()
    dumped = define(tmp_path, scsi.apply(text, attachment))
    hostdevs = dumped.findall("devices/hostdev[@type='scsi_host']")
    assert len(hostdevs) == 1
    hostdev = hostdevs[0]
    assert (hostdev.get("mode"), hostdev.get("model")) == ("subsystem", "virtio")
    assert hostdev.find("source").attrib == {"protocol": "vhost", "wwpn": WWPN}  # type: ignore[union-attr]
    assert hostdev.find("boot") is None


def test_no_boot_from_a_vhost_hostdev() -> None:
    """libvirt's QEMU driver refuses it (test_libvirt_live.py shows it)."""
    with pytest.raises(InvalidArgument, match="cannot boot from a vhost-scsi hostdev"):
        scsi.plan(ScsiMode.VHOST, WWPN, domain(), boot=True)


def test_text_holds_the_elements_then_the_changes(libvirt_tools: None, tmp_path: Path) -> None:
    """What ``storvisor libvirt-xml --scsi`` prints: each element pasted as printed gives a
    domain libvirt defines."""
    text = domain(controller(0, "lsilogic") + virtio_disk("vda", boot=1))
    attachment = scsi.plan(ScsiMode.LUN, LUN, text, boot=True)
    printed = scsi.attachment_text(attachment, "p/v as a LUN")
    elements = list(ET.fromstring(f"<printed>{printed}</printed>"))
    assert [e.tag for e in elements] == ["controller", "disk", "disk"]
    new_controller, new_disk, changed = elements
    assert new_controller.attrib == {"type": "scsi", "index": "1", "model": "virtio-scsi"}
    assert new_disk.find("source").get("dev") == LUN  # type: ignore[union-attr]
    assert changed.find("target").get("dev") == "vda"  # type: ignore[union-attr]
    assert changed.find("boot").get("order") == "2"  # type: ignore[union-attr]
    assert "p/v as a LUN" in printed and "virsh update-device DOMAIN FILE" in printed
    pasted = domain(controller(0, "lsilogic") + ET.tostring(changed, encoding="unicode"))
    pasted = pasted.replace(
        "</devices>",
        ET.tostring(new_controller, encoding="unicode")
        + ET.tostring(new_disk, encoding="unicode")
        + "</devices>",
    )
    define(tmp_path, pasted)


def test_without_a_domain_the_lun_goes_on_a_new_controller_0() -> None:
    attachment = scsi.plan_lun("/dev/sdc")
    assert attachment.new_controller == 0
    assert attachment.address == DriveAddress(0, 0, 0, 0)
    assert attachment.target_dev == "sda"
    assert attachment.devices[1].find("source").get("dev") == "/dev/sdc"  # type: ignore[union-attr]


def test_queues_on_a_new_controller() -> None:
    attachment = scsi.plan_lun(LUN, queues=4)
    assert attachment.devices[0].find("driver").attrib == {"queues": "4"}  # type: ignore[union-attr]


def test_target_names_past_sdz() -> None:
    devices = controller(0, "virtio-scsi") + "".join(
        virtio_disk(name) for name in [f"sd{chr(97 + i)}" for i in range(26)] + ["sdaa"]
    )
    assert DomainDevices.parse(domain(devices)).free_target_dev() == "sdab"


@pytest.mark.parametrize(
    ("uris", "mode", "expected"),
    [
        (
            ("/dev/sdc", "/dev/disk/by-id/wwn-0x6001405a"),
            ScsiMode.LUN,
            "/dev/disk/by-id/wwn-0x6001405a",
        ),
        (("/dev/sdc",), ScsiMode.LUN, "/dev/sdc"),
        (("nbd+unix:///v?socket=/s",), ScsiMode.LUN, None),
        ((WWPN,), ScsiMode.VHOST, WWPN),
        (
            ("/sys/kernel/config/target/vhost/naa.500140512345678a/tpgt_1",),
            ScsiMode.VHOST,
            "naa.500140512345678a",
        ),
        (("/dev/sdc",), ScsiMode.VHOST, None),
    ],
)
def test_export_target(uris: tuple[str, ...], mode: ScsiMode, expected: str | None) -> None:
    assert scsi.export_target(mode, uris) == expected


BAD_DOMAINS = [
    ("<domain><name>x</name>", "not well-formed"),
    ("", "not well-formed"),
    ("<network><name>x</name></network>", "<network>, not <domain>"),
    (domain(controller(0, "virtio-scsi").replace("'0'", "'zero'")), "index='zero'"),
    (domain(scsi_disk("sda", (0, 0)).replace("unit='0'", "unit='-1'")), "unit='-1'"),
    (domain(controller(1, "virtio-scsi") + controller(1, "lsilogic")), "two SCSI controllers"),
    (domain(virtio_disk("vda", 1) + virtio_disk("vdb", 1)), "two devices have boot order 1"),
    (domain(virtio_disk("vda") + virtio_disk("vda")), "two disks have target dev vda"),
    (domain(virtio_disk("vda").replace("order", "x")), ""),
    ('<!DOCTYPE d [<!ENTITY a "aaaa">]><domain/>', "document type"),
]


@pytest.mark.parametrize(("text", "words"), BAD_DOMAINS)
def test_bad_domain_xml_is_one_invalid_argument(text: str, words: str) -> None:
    if words == "":  # a valid domain (a typo'd attribute is libvirt's business)
        DomainDevices.parse(text)
        return
    with pytest.raises(InvalidArgument, match=r"dom\.xml") as caught:
        scsi.plan(ScsiMode.LUN, LUN, text, source="dom.xml")
    message = str(caught.value)
    assert words in message and "\n" not in message


@pytest.mark.parametrize("path", ["sdc", "/tmp/disk", "/dev/", "/dev/../etc/passwd", "/dev/sd\0"])
def test_bad_device_path(path: str) -> None:
    with pytest.raises(InvalidArgument, match="under /dev"):
        scsi.plan_lun(path)


@pytest.mark.parametrize("wwpn", ["naa.123", "5001405123456789", "naa.50014051234567890", "iqn.x"])
def test_bad_wwpn(wwpn: str) -> None:
    with pytest.raises(InvalidArgument, match="WWPN"):
        scsi.plan_vhost(wwpn)


def test_apply_refuses_a_plan_of_another_domain() -> None:
    planned = domain(virtio_disk("vda", boot=1))
    attachment = scsi.plan(ScsiMode.LUN, LUN, planned, boot=True)
    with pytest.raises(InvalidArgument, match="not the domain"):
        scsi.apply(domain(virtio_disk("vda", boot=3)), attachment)


# -- the command ------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    """An offline HOME with the volume ``p/v`` and no export."""
    run_cli = CLI(tmp_path / "home")
    run_cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:64M")
    run_cli("volume", "create", "p/v", "--size", "16M")
    return run_cli


@pytest.mark.parametrize(("mode", "command"), [("lun", "scsi"), ("vhost", "vhost-scsi")])
def test_command_without_the_export_names_the_command_that_makes_it(
    cli: CLI, mode: str, command: str
) -> None:
    line = cli.fails("libvirt-xml", "p/v", "--scsi", mode)
    assert f"run `storvisor export {command} p/v` first" in line


def test_command_errors_are_one_line(cli: CLI, tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain><devices>")
    assert "bad.xml is not well-formed XML" in cli.fails(
        "libvirt-xml", "p/v", "--scsi", "lun", "--domain-xml", str(bad)
    )
    assert "cannot read the domain XML" in cli.fails(
        "libvirt-xml", "p/v", "--scsi", "lun", "--domain-xml", str(tmp_path / "missing.xml")
    )
    assert "go with --scsi" in cli.fails("libvirt-xml", "p/v", "--boot", rc=2)
    assert "cannot boot from a vhost-scsi" in cli.fails(
        "libvirt-xml", "p/v", "--scsi", "vhost", "--boot", rc=2
    )
    assert "invalid choice" in cli.fails("libvirt-xml", "p/v", "--scsi", "disk", rc=2)
    assert "p/nope" in cli.fails("libvirt-xml", "p/nope", "--scsi", "lun")


FUZZ_BASE = domain(
    controller(0, "lsilogic")
    + controller(None, "virtio-scsi")
    + scsi_disk("sda", (0, 0), boot=1)
    + scsi_disk("sdh")
    + NIC.format(order=2),
    "<boot dev='hd'/>",
)


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(0, len(FUZZ_BASE)),
    position=st.integers(0, len(FUZZ_BASE) - 1),
    char=st.sampled_from([*"<>/='\"0-9 x&;!", "0x1", "-1", "99999999999", "\0", "é"]),
    boot=st.booleans(),
)
def test_any_mangled_domain_is_a_plan_or_one_invalid_argument(
    cut: int, position: int, char: str, boot: bool
) -> None:
    for text in (FUZZ_BASE[:cut], FUZZ_BASE[:position] + char + FUZZ_BASE[position + 1 :]):
        try:
            attachment = scsi.plan(ScsiMode.LUN, LUN, text, boot=boot)
        except InvalidArgument as e:
            assert "\n" not in str(e)
            continue
        assert attachment.address is not None
        assert attachment.address not in DomainDevices.parse(text).used
