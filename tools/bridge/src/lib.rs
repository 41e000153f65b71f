//! conductor-bridge: follows a conductor server and drives MIDI clock and OSC from its
//! timeline.
//!
//! ```text
//!   follower thread (conductor-sync)          emitter thread (SCHED_FIFO if allowed)
//!   ws:// ping/pong, timeline, transport ──▶  newest SyncState (wait-free read)
//!   reconnects with backoff                    │ per output: MidiPlan / OscPlan (pure)
//!                                              │ server instant → local instant − nudge
//!                                              ▼ spin_sleep to it, write the bytes
//!                                  MIDI device file · ALSA port (midir) · OSC over UDP (rosc)
//! ```
//!
//! * [`grid`] places the 24-per-beat MIDI clock on the server's ticks; [`midi_plan`] and
//!   [`osc_plan`] decide what each output sends next and when, as pure functions of the
//!   timeline and the current instant.
//! * [`midi_out`] and [`osc_out`] open the devices and write bytes; [`emitter`] is the
//!   real-time thread that sleeps to each instant and writes; [`config`] is the command line.
//! * [`follow`] adapts the sync library (clock sync, timeline, reconnection) to the plans.

pub mod config;
pub mod emitter;
pub mod follow;
pub mod grid;
pub mod midi_out;
pub mod midi_plan;
pub mod osc_out;
pub mod osc_plan;
