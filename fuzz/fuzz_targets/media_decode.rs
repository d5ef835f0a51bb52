//! The media decoders on arbitrary bytes (the first byte picks which):
//! images (PNG, JPEG, WebP, GIF, BMP), GIF videos, audio (WAV, FLAC, MP3,
//! Ogg Vorbis). An error, or media within the stated limits. (Audio samples
//! may be non-finite here: the feature extractor refuses those, by name.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use omni_engine::{AudioInput, ImageInput, VideoInput, MAX_IMAGE_PIXELS, MAX_VIDEO_FRAMES};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(img) = ImageInput::decode(bytes, "fuzz") {
                assert!(u64::from(img.width) * u64::from(img.height) <= MAX_IMAGE_PIXELS as u64);
            }
        }
        1 => {
            if let Ok(video) = VideoInput::decode_gif(bytes, "fuzz") {
                assert!(video.frames.len() <= MAX_VIDEO_FRAMES);
            }
        }
        _ => {
            if let Ok(audio) = AudioInput::decode(bytes, "fuzz") {
                assert!(audio.sample_rate > 0);
            }
        }
    }
});
