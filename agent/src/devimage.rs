//! The base image of dev mode: Debian's `busybox-static` as a whole root filesystem, imported
//! into the local engine as `deployer-dev/busybox:latest`, so the examples build on a machine
//! that can reach no registry.

use std::path::Path;

use bollard::query_parameters::CreateImageOptionsBuilder;
use futures::StreamExt;

use crate::docker::Docker;

pub const REPOSITORY: &str = "deployer-dev/busybox";
pub const TAG: &str = "latest";
/// Where Debian's `busybox-static` puts the binary.
const BUSYBOX: &str = "/bin/busybox";
/// Commands linked to busybox in the image.
const APPLETS: &[&str] = &["sh", "cat", "echo", "ls", "sleep", "httpd", "wget", "env", "mkdir", "rm", "cp", "mv"];

/// Imports the image unless the engine has it. `Ok(false)` when busybox is not installed here.
pub async fn ensure(docker: &Docker) -> Result<bool, String> {
    let reference = format!("{REPOSITORY}:{TAG}");
    if docker.api().inspect_image(&reference).await.is_ok() {
        return Ok(true);
    }
    if !Path::new(BUSYBOX).is_file() {
        return Ok(false);
    }
    let rootfs = tokio::task::spawn_blocking(rootfs_tar)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot pack {BUSYBOX} into an image: {e}"))?;
    let options = CreateImageOptionsBuilder::new().from_src("-").repo(REPOSITORY).tag(TAG).build();
    let mut import =
        std::pin::pin!(docker.api().create_image(Some(options), Some(bollard::body_full(rootfs.into())), None));
    while let Some(step) = import.next().await {
        let info = step.map_err(|e| format!("cannot import {reference}: {e}"))?;
        if let Some(error) = info.error_detail.and_then(|d| d.message) {
            return Err(format!("cannot import {reference}: {error}"));
        }
    }
    Ok(true)
}

/// A tar of `bin/busybox`, its applets as links, and an empty `tmp` and `www`.
fn rootfs_tar() -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for dir in ["bin/", "tmp/", "www/"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(if dir == "tmp/" { 0o1777 } else { 0o755 });
        header.set_size(0);
        builder.append_data(&mut header, dir, std::io::empty())?;
    }
    let binary = std::fs::read(BUSYBOX)?;
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o755);
    header.set_size(binary.len() as u64);
    builder.append_data(&mut header, "bin/busybox", &binary[..])?;
    for applet in APPLETS {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        builder.append_link(&mut header, format!("bin/{applet}"), "busybox")?;
    }
    builder.into_inner()
}
