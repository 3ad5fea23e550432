//! Who decides whether the programs report flow events: the agent's `--flow-events` flag, the
//! config file's `flow_events` field, or the gRPC API's `SetFlowEvents` (`lbctl flow-events`).
//!
//! **The latest instruction wins.** The file's field, when present, overrides the flag. A
//! `SetFlowEvents` call overrides both at once and holds until it is reset, or until the config
//! file's `flow_events` changes (an edit that sets, changes or removes the field): that edit is the
//! newer instruction, and the file decides again. Edits of the file's other settings leave the
//! API's setting in force. A restarted agent takes up the API's setting its predecessor saved
//! (`super::saved`) when the flag and the file's field are still what that setting overrode; if
//! either changed while no agent ran, that change is the newer instruction and the setting is
//! dropped.

use serde::{Deserialize, Serialize};

/// The API's setting with the flag and file field it overrode: what a restarted agent needs to
/// know whether it still holds ([`FlowEventsSwitch::resume`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSetting {
    pub enabled: bool,
    pub flag: bool,
    pub file: Option<bool>,
}

/// Which setting decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchSource {
    /// `--flow-events` (the file has no `flow_events`, the API set nothing).
    Flag,
    /// The config file's `flow_events`.
    ConfigFile,
    /// `SetFlowEvents`.
    Api,
}

/// The settings of every source, and which one decides (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEventsSwitch {
    flag: bool,
    file: Option<bool>,
    api: Option<bool>,
}

/// The switch as `ListState` and `SetFlowEvents` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEventsState {
    /// The programs report flow events now.
    pub running: bool,
    /// The deciding setting; differs from `running` only while a reload has failed.
    pub wanted: bool,
    pub source: SwitchSource,
    pub flag: bool,
    pub file: Option<bool>,
    pub api: Option<bool>,
}

impl FlowEventsSwitch {
    /// The agent's flag and its config file's field, no API setting.
    pub fn new(flag: bool, file: Option<bool>) -> Self {
        Self {
            flag,
            file,
            api: None,
        }
    }

    /// Whether the programs should report flow events.
    pub fn wanted(&self) -> bool {
        self.api.or(self.file).unwrap_or(self.flag)
    }

    pub fn source(&self) -> SwitchSource {
        match (self.api, self.file) {
            (Some(_), _) => SwitchSource::Api,
            (None, Some(_)) => SwitchSource::ConfigFile,
            (None, None) => SwitchSource::Flag,
        }
    }

    /// The config file's `flow_events` as just read. A value other than the last one drops the
    /// API's setting; returns whether it did.
    pub fn set_file(&mut self, file: Option<bool>) -> bool {
        if file == self.file {
            return false;
        }
        self.file = file;
        self.api.take().is_some()
    }

    /// The API's setting; `None` resets it (the file, else the flag, decides again).
    pub fn set_api(&mut self, enabled: Option<bool>) {
        self.api = enabled;
    }

    /// The API's setting, if it made one, with what it overrode.
    pub fn api_setting(&self) -> Option<ApiSetting> {
        self.api.map(|enabled| ApiSetting {
            enabled,
            flag: self.flag,
            file: self.file,
        })
    }

    /// Takes up `saved`, an earlier agent's API setting, if the flag and the file's field are
    /// what it overrode (else they changed since: the newer instruction, which stands); returns
    /// whether it did.
    pub fn resume(&mut self, saved: ApiSetting) -> bool {
        let holds = saved.flag == self.flag && saved.file == self.file;
        if holds {
            self.api = Some(saved.enabled);
        }
        holds
    }

    /// The switch, with whether the programs report flow events now.
    pub fn state(&self, running: bool) -> FlowEventsState {
        FlowEventsState {
            running,
            wanted: self.wanted(),
            source: self.source(),
            flag: self.flag,
            file: self.file,
            api: self.api,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_overrides_the_flag() {
        for flag in [false, true] {
            let switch = FlowEventsSwitch::new(flag, None);
            assert_eq!(
                (switch.wanted(), switch.source()),
                (flag, SwitchSource::Flag)
            );
            for file in [false, true] {
                let switch = FlowEventsSwitch::new(flag, Some(file));
                assert_eq!(
                    (switch.wanted(), switch.source()),
                    (file, SwitchSource::ConfigFile)
                );
            }
        }
    }

    #[test]
    fn the_api_overrides_the_file_and_the_flag_until_reset() {
        let mut switch = FlowEventsSwitch::new(false, Some(false));
        switch.set_api(Some(true));
        assert_eq!(
            (switch.wanted(), switch.source()),
            (true, SwitchSource::Api)
        );
        switch.set_api(Some(false));
        assert_eq!(
            (switch.wanted(), switch.source()),
            (false, SwitchSource::Api)
        );
        let mut switch = FlowEventsSwitch::new(true, None);
        switch.set_api(Some(false));
        assert!(!switch.wanted());
        switch.set_api(None);
        assert_eq!(
            (switch.wanted(), switch.source()),
            (true, SwitchSource::Flag)
        );
    }

    #[test]
    fn a_file_edit_that_keeps_flow_events_keeps_the_api_setting() {
        for file in [None, Some(false), Some(true)] {
            let mut switch = FlowEventsSwitch::new(false, file);
            switch.set_api(Some(true));
            assert!(!switch.set_file(file), "{file:?}");
            assert_eq!(
                (switch.wanted(), switch.source()),
                (true, SwitchSource::Api)
            );
        }
    }

    #[test]
    fn a_file_edit_that_changes_flow_events_is_the_latest_instruction() {
        // Set, changed, removed: each time the file decides again.
        for (before, after) in [
            (None, Some(false)),
            (Some(false), Some(true)),
            (Some(true), None),
        ] {
            let mut switch = FlowEventsSwitch::new(false, before);
            switch.set_api(Some(true));
            assert!(switch.set_file(after), "{before:?} -> {after:?}");
            assert_eq!(switch.wanted(), after.unwrap_or(false));
            assert_ne!(switch.source(), SwitchSource::Api);
            // The next edit without a change of the field drops nothing.
            assert!(!switch.set_file(after));
        }
        // Changed to the value the API had set: the file decides (a reset would not switch).
        let mut switch = FlowEventsSwitch::new(false, Some(false));
        switch.set_api(Some(true));
        switch.set_file(Some(true));
        assert_eq!(switch.source(), SwitchSource::ConfigFile);
        switch.set_file(Some(false));
        assert!(!switch.wanted());
    }

    #[test]
    fn the_state_tells_running_from_wanted() {
        let mut switch = FlowEventsSwitch::new(true, Some(false));
        switch.set_api(Some(true));
        assert_eq!(
            switch.state(false),
            FlowEventsState {
                running: false,
                wanted: true,
                source: SwitchSource::Api,
                flag: true,
                file: Some(false),
                api: Some(true),
            }
        );
    }

    #[test]
    fn a_saved_api_setting_holds_only_while_the_flag_and_the_file_are_unchanged() {
        let mut before = FlowEventsSwitch::new(false, None);
        assert_eq!(before.api_setting(), None);
        before.set_api(Some(true));
        let saved = before.api_setting().expect("the API set it");
        assert_eq!(
            saved,
            ApiSetting {
                enabled: true,
                flag: false,
                file: None
            }
        );
        let mut after = FlowEventsSwitch::new(false, None);
        assert!(after.resume(saved));
        assert_eq!((after.wanted(), after.source()), (true, SwitchSource::Api));
        for (flag, file) in [(true, None), (false, Some(false)), (false, Some(true))] {
            let mut after = FlowEventsSwitch::new(flag, file);
            assert!(!after.resume(saved), "{flag} {file:?}");
            assert_ne!(after.source(), SwitchSource::Api);
            assert_eq!(after.api_setting(), None);
        }
    }
}
