"""Hydra search-path plugin: a `conf/` folder in the working directory adds option files to sweepbp.

A user puts `conf/model/my_model.yaml` next to where they run `python -m sweepbp` and selects it with
`model=my_model`, without touching the installed package. When the application is sweepbp, it also stores
sweepbp's launcher presets (sweepbp.cli.launchers) before Hydra composes anything.
"""


from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class SweepbpUserConfig(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from sweepbp.cli.paths import config_dir, user_config_dir

        shipped = str(config_dir())
        if not any(shipped in str(element.path) for element in search_path.get_path()):
            return  # another Hydra application: leave it alone
        from sweepbp.cli.launchers import register_launcher_presets, register_resolver

        register_resolver()
        register_launcher_presets()
        user = user_config_dir()
        if user is not None:
            search_path.append(provider="sweepbp-user", path=f"file://{user}")
