# Sourced by .ci/run: Mesa 25 lavapipe from the backports suite of the Debian archive this
# machine already uses, extracted beside the system's Mesa (never installed over it), so both
# drivers stay available. Sets MESA25_ICD (an ICD file for VK_ICD_FILENAMES) and MESA25_LIBS
# (its libdrm, newer than the system's, for LD_LIBRARY_PATH).
mesa25_root=/opt/divergen-mesa25
MESA25_ICD=$mesa25_root/lvp_icd.json
MESA25_LIBS=$mesa25_root/root/usr/lib/x86_64-linux-gnu
if [ ! -e "$MESA25_ICD" ]; then
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  # The archive's address, as the machine's own sources name it.
  archive=$(awk -v s="$codename" '/^URIs:/ {u=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == s) {print u; exit}}' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null)
  if [ -z "$archive" ]; then
    archive=$(awk -v s="$codename" '$1 == "deb" && $3 == s {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  fi
  [ -n "$archive" ] || { echo "error: no Debian archive for $codename in the apt sources" >&2; exit 1; }
  printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$archive" "$codename" >/etc/apt/sources.list.d/divergen-backports.sources
  apt-get update -qq
  mesa25_debs=$(mktemp -d)
  (cd "$mesa25_debs" && chmod 755 . && apt-get download -qq "mesa-vulkan-drivers/$codename-backports" "libdrm2/$codename-backports")
  rm -rf "$mesa25_root"
  mkdir -p "$mesa25_root/root"
  for f in "$mesa25_debs"/*.deb; do dpkg -x "$f" "$mesa25_root/root"; done
  sed "s#\"library_path\": *\"[^\"]*\"#\"library_path\": \"$MESA25_LIBS/libvulkan_lvp.so\"#" \
    "$mesa25_root/root/usr/share/vulkan/icd.d/lvp_icd.json" >"$MESA25_ICD.tmp"
  mv "$MESA25_ICD.tmp" "$MESA25_ICD"
  rm -rf "$mesa25_debs"
fi
export MESA25_ICD MESA25_LIBS
