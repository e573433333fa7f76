log("before");
throw new Error("top-level failure");
