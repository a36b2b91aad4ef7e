"""SCons build script of the tpfed-qemu platform.

Bare-metal Cortex-M build with the system's arm-none-eabi GCC (from PATH; no registry
toolchain), newlib-nano, the port's own startup code and linker script (board_build.ldscript).
Targets: the default build (firmware.elf + firmware.bin + size check), `size`, `upload`
(checks the image only: an emulated board is "flashed" by starting QEMU with the ELF, see
host/tpfed/emulator.py) and `exec` (boots the firmware in QEMU with the UART on stdio).
"""

import os
import shutil
import subprocess

from SCons.Script import AlwaysBuild, Builder, Default, DefaultEnvironment

env = DefaultEnvironment()
board = env.BoardConfig()
cpu = board.get("build.cpu", "cortex-m3")
machine = board.get("build.qemu_machine", "lm3s6965evb")

PREFIX = "arm-none-eabi-"
env.Replace(
    AR=PREFIX + "gcc-ar",
    AS=PREFIX + "as",
    CC=PREFIX + "gcc",
    CXX=PREFIX + "g++",
    GDB=PREFIX + "gdb",
    OBJCOPY=PREFIX + "objcopy",
    RANLIB=PREFIX + "gcc-ranlib",
    SIZETOOL=PREFIX + "size",
    ARFLAGS=["rc"],
    SIZEPROGREGEXP=r"^(?:\.isr_vector|\.text|\.rodata|\.data|\.ARM\.exidx|\.ARM\.extab)\s+(\d+).*",
    SIZEDATAREGEXP=r"^(?:\.data|\.bss|\.stack)\s+(\d+).*",
    SIZECHECKCMD="$SIZETOOL -A -d $SOURCES",
    SIZEPRINTCMD="$SIZETOOL -B -d $SOURCES",
    PROGSUFFIX=".elf",
)
if env.get("PROGNAME", "program") == "program":
    env.Replace(PROGNAME="firmware")

# Soft-float on every board, also the Cortex-M33 (musca-b1) whose FPU QEMU models: libgcc's
# IEEE single-precision routines give the host's results bit for bit (with -ffp-contract=off).
machine_flags = [f"-mcpu={cpu}", "-mthumb", "-mfloat-abi=soft"]
env.Append(
    ASFLAGS=machine_flags,
    CCFLAGS=machine_flags
    + ["-Os", "-ffunction-sections", "-fdata-sections", "-Wall", "-Wextra", "-ffp-contract=off"],
    CFLAGS=["-std=c99"],
    CPPDEFINES=[("F_CPU", "$BOARD_F_CPU"), "TPFED_BARE_METAL"],
    LINKFLAGS=machine_flags
    + [
        "-nostartfiles",
        "--specs=nano.specs",
        "--specs=nosys.specs",
        "-Wl,--gc-sections",
        "-Wl,-Map,${BUILD_DIR}/${PROGNAME}.map",
    ],
    LIBS=["m", "c", "gcc"],
    BUILDERS=dict(
        ElfToBin=Builder(
            action=env.VerboseAction(
                "$OBJCOPY -O binary $SOURCES $TARGET", "Building $TARGET"
            ),
            suffix=".bin",
        )
    ),
)

if not board.get("build.ldscript", ""):
    env.Exit("tpfed-qemu: set board_build.ldscript to the port's linker script")

target_elf = env.BuildProgram()
target_bin = env.ElfToBin(os.path.join("$BUILD_DIR", "${PROGNAME}"), target_elf)
env.Depends(target_bin, "checkprogsize")

AlwaysBuild(env.Alias("nobuild", target_bin))
target_buildprog = env.Alias("buildprog", target_bin, target_bin)

target_size = env.Alias(
    "size", target_elf, env.VerboseAction("$SIZEPRINTCMD", "Calculating size $SOURCE")
)
AlwaysBuild(target_size)


def _announce_image(target, source, env):
    print(f"tpfed-qemu: {source[0]} is ready; boards start it under QEMU ({machine})")


def _exec_in_qemu(target, source, env):
    qemu = shutil.which("qemu-system-arm")
    if not qemu:
        print("tpfed-qemu: qemu-system-arm is not on PATH (Debian: apt-get install qemu-system-arm)")
        return 1
    cmd = [qemu, "-machine", machine, "-nographic", "-monitor", "none", "-serial", "stdio",
           "-no-reboot", "-kernel", str(source[0])]
    return subprocess.call(cmd)


upload = env.Alias("upload", target_elf, env.VerboseAction(_announce_image, "Checking image"))
AlwaysBuild(upload)
AlwaysBuild(env.Alias("exec", target_elf, env.VerboseAction(_exec_in_qemu, "Running in QEMU")))

Default([target_buildprog, target_size])
