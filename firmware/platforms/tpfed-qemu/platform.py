"""tpfed QEMU platform: no registry packages; the cross toolchain and QEMU come from the system."""

import shutil

from platformio.exception import UserSideException
from platformio.public import PlatformBase


class TpfedqemuPlatform(PlatformBase):
    def configure_default_packages(self, variables, targets):
        for tool in ("arm-none-eabi-gcc", "arm-none-eabi-objcopy", "arm-none-eabi-size"):
            if not shutil.which(tool):
                raise UserSideException(
                    f"{tool} is not on PATH; install the cross toolchain "
                    "(Debian: apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi)"
                )
        return super().configure_default_packages(variables, targets)

    def is_embedded(self):
        return True
