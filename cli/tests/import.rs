//! `ferry import NAME.pvm`: Parallels bundles built here from the published structure
//! (config.pvs elements as Parallels Desktop writes them, .hdd bundles with
//! DiskDescriptor.xml, old single-file .hdd images), imported and read back; and bad input
//! that must fail with one sentence and write nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_storage::{create_image, CreateOptions, Disk, FormatKind, Variant};

const MIB: u64 = 1 << 20;
const TOP: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("import-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A Parallels image file (old "WithoutFreeSpace" header) holding `fill` in its first MiB.
fn prl_image(path: &Path, fill: u8) {
    let layer = create_image(
        path,
        FormatKind::Parallels,
        &CreateOptions {
            size: 16 * MIB,
            variant: Variant::Dynamic,
            parent: None,
        },
    )
    .unwrap();
    let disk = Disk::from_layers(vec![layer]).unwrap();
    disk.write_at(&vec![fill; MIB as usize], 0).unwrap();
    disk.write_at(&[fill ^ 0xff; 4096], 9 * MIB).unwrap();
    disk.flush().unwrap();
}

/// A `NAME.hdd` bundle: DiskDescriptor.xml and one image at the top GUID.
fn hdd_bundle(dir: &Path, fill: u8) {
    std::fs::create_dir_all(dir).unwrap();
    let name = dir.file_name().unwrap().to_str().unwrap();
    let hds = format!("{name}.0.{TOP}.hds");
    prl_image(&dir.join(&hds), fill);
    let sectors = 16 * MIB / 512;
    let xml = format!(
        r#"<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{sectors}</Disk_size>
        <Cylinders>{}</Cylinders>
        <PhysicalSectorSize>512</PhysicalSectorSize>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>0</Padding>
        <UID>{{6c0a3b4e-2a5d-4f7e-9b1c-0d2e3f405162}}</UID>
        <Name>{name}</Name>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{sectors}</End>
            <Blocksize>2048</Blocksize>
            <Image>
                <GUID>{TOP}</GUID>
                <Type>Compressed</Type>
                <File>{hds}</File>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <Shot>
            <GUID>{TOP}</GUID>
            <ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
"#,
        sectors / 512
    );
    std::fs::write(dir.join("DiskDescriptor.xml"), xml).unwrap();
}

/// config.pvs as Parallels Desktop writes it (trimmed to the parts import reads, plus a few
/// it must list as not carried over).
fn config_pvs(hdds: &str, cdroms: &str, efi: bool, os: (u32, u32)) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<ParallelsVirtualMachine schemaVersion="1.0" dyn_lists="VirtualAppliance 0">
   <AppVersion>18.1.1-53328</AppVersion>
   <Identification dyn_lists="">
      <VmUuid>{{9c27ae79-fbe5-4c84-9cdc-e1459f642b91}}</VmUuid>
      <VmName>Windows XP</VmName>
   </Identification>
   <Settings dyn_lists="">
      <General dyn_lists="PrevOsNumber"><OsType>{}</OsType><OsNumber>{}</OsNumber></General>
      <Startup dyn_lists="">
         <BootingOrder dyn_lists="BootDevice 3">
            <BootDevice id="0" dyn_lists=""><Index>0</Index><Type>5</Type><BootingNumber>1</BootingNumber><InUse>1</InUse></BootDevice>
            <BootDevice id="1" dyn_lists=""><Index>0</Index><Type>6</Type><BootingNumber>0</BootingNumber><InUse>1</InUse></BootDevice>
            <BootDevice id="2" dyn_lists=""><Index>0</Index><Type>8</Type><BootingNumber>2</BootingNumber><InUse>0</InUse></BootDevice>
         </BootingOrder>
         <Bios dyn_lists=""><EfiEnabled>{}</EfiEnabled></Bios>
      </Startup>
      <Tools dyn_lists="">
         <SharedFolders dyn_lists=""><HostSharing dyn_lists="SharedFolder 1"><Enabled>1</Enabled>
            <SharedFolder dyn_lists=""><Name>Home</Name><Path>/Users/me</Path></SharedFolder>
         </HostSharing></SharedFolders>
      </Tools>
   </Settings>
   <Hardware dyn_lists="Fdd 0 CdRom 1 Hdd 2 NetworkAdapter 1">
      <Cpu dyn_lists=""><Number>2</Number></Cpu>
      <Memory dyn_lists=""><RAM>1024</RAM></Memory>
      {cdroms}
      {hdds}
      <NetworkAdapter id="0" dyn_lists=""><Index>0</Index><Enabled>1</Enabled><MAC>001C42AABBCC</MAC></NetworkAdapter>
   </Hardware>
</ParallelsVirtualMachine>
"#,
        os.0,
        os.1,
        u8::from(efi)
    )
}

fn hdd(index: u32, system: &str, iface: u32, stack: u32) -> String {
    format!(
        r#"<Hdd id="{index}" dyn_lists="Partition 0"><Index>{index}</Index><Enabled>1</Enabled><Connected>1</Connected><EmulatedType>1</EmulatedType><SystemName>{system}</SystemName><UserFriendlyName>{system}</UserFriendlyName><InterfaceType>{iface}</InterfaceType><StackIndex>{stack}</StackIndex><DiskType>1</DiskType><SubType>0</SubType></Hdd>"#
    )
}

fn cdrom(system: &str, iface: u32, stack: u32) -> String {
    format!(
        r#"<CdRom id="0" dyn_lists=""><Index>0</Index><Enabled>1</Enabled><Connected>1</Connected><EmulatedType>1</EmulatedType><SystemName>{system}</SystemName><InterfaceType>{iface}</InterfaceType><StackIndex>{stack}</StackIndex></CdRom>"#
    )
}

/// A Windows XP VM on IDE: its system disk an .hdd bundle named by the Mac path it had there,
/// a second disk in the old single-file format, an installer ISO that stayed on the Mac.
fn xp_bundle(root: &Path) -> PathBuf {
    let pvm = root.join("Windows XP.pvm");
    std::fs::create_dir_all(&pvm).unwrap();
    hdd_bundle(&pvm.join("harddisk.hdd"), 0x11);
    prl_image(&pvm.join("data.hdd"), 0x22);
    let hdds =
        hdd(0, "/Users/me/Parallels/Windows XP.pvm/harddisk.hdd", 0, 0) + &hdd(1, "data.hdd", 0, 1);
    let cds = cdrom("/Users/me/Downloads/winxp.iso", 0, 2);
    std::fs::write(
        pvm.join("config.pvs"),
        config_pvs(&hdds, &cds, false, (8, 0x0807)),
    )
    .unwrap();
    pvm
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One error line, exit code 1, no panic.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
}

#[test]
fn imports_windows_xp_on_ide() {
    let root = scratch("xp");
    let pvm = xp_bundle(&root);
    let out = ferry().arg("import").arg(&pvm).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hard disk 0 (IDE 0:0) -> IDE ide-piix4 port 0 device 0"),
        "{text}"
    );
    assert!(
        text.contains("hard disk 1 (IDE 0:1) -> IDE ide-piix4 port 0 device 1"),
        "{text}"
    );
    assert!(text.contains("network adapter 0"), "{text}");
    assert!(text.contains("shared folders: Home"), "{text}");
    assert!(text.contains("Parallels Tools"), "{text}");
    assert!(text.contains("winxp.iso was not found"), "{text}");
    assert!(text.contains("guest Windows XP"), "{text}");

    // The definition reads back, with the disks in place, relative to its folder.
    let toml_path = root.join("Windows XP.toml");
    let def: toml::Table = toml::from_str(&std::fs::read_to_string(&toml_path).unwrap()).unwrap();
    assert_eq!(def["name"].as_str(), Some("Windows XP"));
    assert_eq!(def["memory"].as_str(), Some("1G"));
    assert_eq!(def["cpus"].as_integer(), Some(2));
    assert_eq!(def["firmware"].as_str(), Some("bios"));
    let boot: Vec<&str> = def["boot"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(boot, ["disk", "dvd"]);
    let ctl = def["storagectl"].as_array().unwrap();
    assert_eq!(ctl.len(), 1);
    assert_eq!(ctl[0]["type"].as_str(), Some("ide-piix4"));
    let att = def["attach"].as_array().unwrap();
    assert_eq!(att.len(), 2);
    assert_eq!(
        att[0]["medium"].as_str(),
        Some("Windows XP.pvm/harddisk.hdd")
    );
    assert_eq!(att[1]["medium"].as_str(), Some("Windows XP.pvm/data.hdd"));
    assert_eq!(att[1]["device"].as_integer(), Some(1));

    // ferry run reads it, opens both disks, and stops at the missing controller model.
    let out = ferry().arg("run").arg(&toml_path).output().unwrap();
    assert_clean_error(
        &out,
        "storage controller type 'ide-piix4' is not implemented yet",
    );

    // A second import does not overwrite the first without --force.
    let out = ferry().arg("import").arg(&pvm).output().unwrap();
    assert_clean_error(&out, "already exists");
    let out = ferry()
        .args(["import", "--force"])
        .arg(&pvm)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn json_report() {
    let root = scratch("json");
    let pvm = xp_bundle(&root);
    let out_toml = root.join("out/xp.toml");
    std::fs::create_dir_all(out_toml.parent().unwrap()).unwrap();
    let out = ferry()
        .args(["import", "--json", "-o"])
        .arg(&out_toml)
        .arg(pvm.join("config.pvs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["name"], "Windows XP");
    assert_eq!(r["memory_mib"], 1024);
    assert_eq!(r["cpus"], 2);
    assert_eq!(r["firmware"], "bios");
    assert_eq!(r["drives"][0]["type"], "ide-piix4");
    assert_eq!(r["drives"][0]["format"], "parallels");
    assert_eq!(r["drives"][0]["size"], 16 * MIB);
    assert_eq!(r["drives"][1]["device"], 1);
    assert!(r["not_carried"].as_array().unwrap().len() >= 3);
    // Outside the definition's folder, media paths are absolute.
    let def: toml::Table = toml::from_str(&std::fs::read_to_string(&out_toml).unwrap()).unwrap();
    let medium = def["attach"][0]["medium"].as_str().unwrap();
    assert!(Path::new(medium).is_absolute(), "{medium}");
    assert!(Path::new(medium).exists(), "{medium}");
}

#[test]
fn efi_ubuntu_on_sata_and_nvme() {
    let root = scratch("ubuntu");
    let pvm = root.join("Ubuntu.pvm");
    std::fs::create_dir_all(&pvm).unwrap();
    hdd_bundle(&pvm.join("Ubuntu-0.hdd"), 1);
    hdd_bundle(&pvm.join("Ubuntu-1.hdd"), 2);
    prl_image(&pvm.join("scsi.hdd"), 3);
    std::fs::write(pvm.join("ubuntu.iso"), vec![0u8; 64 * 1024]).unwrap();
    // SATA, NVMe, and SCSI (SubType 0: BusLogic) at position 3.
    let hdds =
        hdd(0, "Ubuntu-0.hdd", 2, 0) + &hdd(1, "Ubuntu-1.hdd", 3, 0) + &hdd(2, "scsi.hdd", 1, 3);
    std::fs::write(
        pvm.join("config.pvs"),
        config_pvs(&hdds, &cdrom("ubuntu.iso", 2, 1), true, (9, 0x090A)),
    )
    .unwrap();
    let out = ferry()
        .args(["import", "--json"])
        .arg(&pvm)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["firmware"], "efi");
    assert_eq!(r["guest"], "Ubuntu");
    let types: Vec<&str> = r["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ahci", "nvme", "buslogic", "ahci"]);
    assert_eq!(r["drives"][2]["port"], 3);
    assert_eq!(r["drives"][3]["port"], 1);
    let def: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("Ubuntu.toml")).unwrap()).unwrap();
    assert_eq!(def["attach"][3]["type"].as_str(), Some("dvd"));
    assert_eq!(def["storagectl"].as_array().unwrap().len(), 3);
    assert_eq!(def["firmware"].as_str(), Some("efi"));
}

#[test]
fn convert_copies_the_disks() {
    let root = scratch("convert");
    let pvm = xp_bundle(&root);
    let out = ferry()
        .args(["import", "--convert", "vdi"])
        .arg(&pvm)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let vdi = root.join("Windows XP disks/harddisk.vdi");
    assert!(vdi.is_file());
    let def: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("Windows XP.toml")).unwrap()).unwrap();
    assert_eq!(
        def["attach"][0]["medium"].as_str(),
        Some("Windows XP disks/harddisk.vdi")
    );
    // Same bytes as the Parallels disk, read through ferry...
    let a = Disk::open(&pvm.join("harddisk.hdd"), false, &[]).unwrap();
    let b = Disk::open(&vdi, false, &[]).unwrap();
    assert_eq!(a.size(), b.size());
    let (mut x, mut y) = (vec![0u8; 16 * MIB as usize], vec![0u8; 16 * MIB as usize]);
    a.read_at(&mut x, 0).unwrap();
    b.read_at(&mut y, 0).unwrap();
    assert!(x == y, "the copy differs");
    assert_eq!(y[0], 0x11);
    // ...and through qemu-img, the referee.
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        let hds = pvm.join(format!("harddisk.hdd/harddisk.hdd.0.{TOP}.hds"));
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "parallels", "-F", "vdi"])
            .arg(&hds)
            .arg(&vdi)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Bad input: one sentence, exit 1, and nothing written beside the bundle.
fn assert_refused(root: &Path, target: &Path, needle: &str) {
    let before: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let out = ferry().arg("import").arg(target).output().unwrap();
    assert_clean_error(&out, needle);
    let after: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(before, after, "import wrote something");
}

#[test]
fn not_a_bundle() {
    let root = scratch("notabundle");
    let empty = root.join("Empty.pvm");
    std::fs::create_dir_all(&empty).unwrap();
    assert_refused(
        &root,
        &empty,
        "is not a Parallels VM bundle: it has no config.pvs",
    );
    assert_refused(&root, &root.join("Nope.pvm"), "does not exist");
    let file = root.join("notes.txt");
    std::fs::write(&file, "hello").unwrap();
    assert_refused(&root, &file, "give the NAME.pvm folder");
}

#[test]
fn broken_xml() {
    let root = scratch("badxml");
    let pvm = xp_bundle(&root);
    let cfg = std::fs::read_to_string(pvm.join("config.pvs")).unwrap();
    std::fs::write(pvm.join("config.pvs"), &cfg[..cfg.len() / 2]).unwrap();
    assert_refused(
        &root,
        &pvm,
        "is not a Parallels VM configuration: it is not XML",
    );
    std::fs::write(pvm.join("config.pvs"), "<vbox/>").unwrap();
    assert_refused(&root, &pvm, "not <ParallelsVirtualMachine>");
    std::fs::write(
        pvm.join("config.pvs"),
        cfg.replace("<RAM>1024</RAM>", "<RAM>lots</RAM>"),
    )
    .unwrap();
    assert_refused(&root, &pvm, "Memory/RAM");
}

#[test]
fn missing_disk() {
    let root = scratch("missing");
    let pvm = xp_bundle(&root);
    std::fs::remove_file(pvm.join("data.hdd")).unwrap();
    assert_refused(&root, &pvm, "hard disk 1: its image");
    // A broken disk is refused too, before anything is written.
    std::fs::write(pvm.join("data.hdd"), b"WithoutFreeSpace but not really").unwrap();
    assert_refused(&root, &pvm, "hard disk 1");
    // Even with --convert, nothing is copied.
    let out = ferry()
        .args(["import", "--convert", "vdi"])
        .arg(&pvm)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!root.join("Windows XP disks").exists());
}
